"""A restricted unpickler for LLaRA's pandas pickles (`train_data.df`, ...).

`pickle` executes whatever callables a file names, so a data file is code. These files only
need the handful of pandas/numpy reconstruction globals below; any other global (for example
`os.system`) is refused before anything is called, with an error naming the file and the
global. numpy 2 renamed `numpy.core` to `numpy._core`; both spellings are admitted.
"""

import importlib
import io
import os
import pickle

from rsllm_jax.data.errors import DataError

# (module, name) pairs a pandas DataFrame pickle of integer/object columns needs: the first
# group as written by the pandas 1.x that made LLaRA's files, the second by pandas 3 (whose
# string column index is an Arrow array), so users can supply files they wrote themselves.
ALLOWED_GLOBALS = frozenset({
    ("pandas.core.frame", "DataFrame"),
    ("pandas.core.internals.managers", "BlockManager"),
    ("pandas._libs.internals", "_unpickle_block"),
    ("pandas.core.indexes.base", "_new_Index"),
    ("pandas.core.indexes.base", "Index"),
    ("pandas.core.indexes.range", "RangeIndex"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("builtins", "slice"),
    # pandas 3:
    ("pandas", "DataFrame"),
    ("pandas", "Index"),
    ("pandas", "RangeIndex"),
    ("pandas", "StringDtype"),
    ("pandas.arrays", "ArrowStringArray"),
    ("pyarrow.lib", "_restore_array"),
    ("pyarrow.lib", "type_for_alias"),
    ("pyarrow.lib", "py_buffer"),
})


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only ALLOWED_GLOBALS; everything else raises DataError."""

    def __init__(self, file, path):
        super().__init__(file)
        self._path = path

    def find_class(self, module, name):
        if (module, name) not in ALLOWED_GLOBALS:
            raise DataError(self._path, f"refusing to unpickle global {module}.{name}: only "
                            "pandas/numpy reconstruction globals are allowed in data files")
        if module.startswith("numpy.core."):
            module = "numpy._core." + module[len("numpy.core."):]
        return getattr(importlib.import_module(module), name)

    def persistent_load(self, pid):
        raise DataError(self._path, "persistent ids are not allowed in data files")


def load_dataframe(path):
    """Reads a pandas DataFrame pickle through the restricted unpickler.

    Raises DataError naming the file for a missing, truncated, non-pickle or non-DataFrame file,
    or one that references a global outside ALLOWED_GLOBALS.
    """
    import pandas as pd  # Imported here: only `prepare` needs pandas.

    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(path, f"cannot read file ({e.strerror})") from e
    if not data.startswith(b"\x80"):
        raise DataError(path, "not a pickle file (no pickle protocol header)")
    try:
        frame = _RestrictedUnpickler(io.BytesIO(data), path).load()
    except DataError:
        raise
    except (EOFError, pickle.UnpicklingError) as e:
        raise DataError(path, f"truncated or corrupt pickle ({e})") from e
    except Exception as e:  # pandas/numpy reject malformed reconstruction arguments.
        raise DataError(path, f"malformed pickle ({type(e).__name__}: {e})") from e
    if not isinstance(frame, pd.DataFrame):
        raise DataError(path, f"expected a pandas DataFrame, found {type(frame).__name__}")
    return frame
