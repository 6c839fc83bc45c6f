"""Reads LLaRA's pandas pickles (`train_data.df`, ...) without running them.

`pickle` calls whatever a file names with arguments the file chooses, so a data file is code;
even pandas', numpy's and pyarrow's own reconstructors are unsafe on crafted arguments (string
offsets past their buffer crash pyarrow, a RangeIndex of 10^8 rows allocates gigabytes). So
nothing a file names is called here. The unpickler resolves the few globals a DataFrame pickle
uses (`ADMITTED`; pandas 1.4+ and numpy 1/2 spellings) to inert records of their arguments and
refuses any other global before anything runs; like every unpickler here it allocates nothing
a file merely declares (checkpoint/unpickler.py). `_frame` then checks the records (types, every
shape against the bytes present, string offsets against their buffer, each column covered
once, one row count) and builds the columns as NumPy arrays itself, so nothing is allocated
beyond what the file holds. Every problem is a DataError naming the file.
"""

import os
import pickle
import re

import numpy as np

from rsllm_jax.checkpoint.unpickler import BoundedUnpickler
from rsllm_jax.data.errors import DataError

# (module, name) → what the record stands for. pandas 1.4-2 (LLaRA's files) write the first
# spellings; pandas 3 writes its column names as a pyarrow string array.
ADMITTED = {
    ("pandas.core.frame", "DataFrame"): "DataFrame",
    ("pandas", "DataFrame"): "DataFrame",
    ("pandas.core.internals.managers", "BlockManager"): "BlockManager",
    ("pandas._libs.internals", "_unpickle_block"): "block",
    ("pandas.core.indexes.base", "_new_Index"): "new_index",
    ("pandas.core.indexes.base", "Index"): "Index",
    ("pandas", "Index"): "Index",
    ("pandas.core.indexes.range", "RangeIndex"): "RangeIndex",
    ("pandas", "RangeIndex"): "RangeIndex",
    ("pandas", "StringDtype"): "StringDtype",
    ("pandas.arrays", "ArrowStringArray"): "ArrowStringArray",
    ("numpy", "ndarray"): "ndarray",
    ("numpy", "dtype"): "dtype",
    ("numpy.core.multiarray", "_reconstruct"): "reconstruct",
    ("numpy._core.multiarray", "_reconstruct"): "reconstruct",
    ("numpy.core.multiarray", "scalar"): "scalar",
    ("numpy._core.multiarray", "scalar"): "scalar",
    ("numpy.core.numeric", "_frombuffer"): "frombuffer",
    ("numpy._core.numeric", "_frombuffer"): "frombuffer",
    ("builtins", "slice"): "slice",
    ("pyarrow.lib", "_restore_array"): "restore_array",
    ("pyarrow.lib", "type_for_alias"): "type_for_alias",
    ("pyarrow.lib", "py_buffer"): "py_buffer",
}
# The only dtypes a column, index or scalar may have: bool, integers, floats, Python objects.
_DTYPE_SPEC = re.compile(r"^(b1|[iu][1248]|f[248]|O[48])$")
_ARROW_STRING_TYPES = {"string": 4, "utf8": 4, "large_string": 8, "large_utf8": 8}


class _Malformed(Exception):
    """Raised inside the reader; load_dataframe turns it into a DataError naming the file."""


class _Record:
    """An admitted global's call kept as data: `args`, and `state` when pickle BUILDs it."""

    kind = ""

    def __new__(cls, *args, **kwargs):  # REDUCE calls the class, NEWOBJ its __new__.
        if kwargs:
            raise _Malformed(f"{cls.kind} called with keyword arguments")
        record = object.__new__(cls)
        record.args, record.state = args, None
        return record

    def __init__(self, *args, **kwargs):
        del args, kwargs

    def __setstate__(self, state):
        self.state = state


_RECORDS = {kind: type(kind, (_Record, ), {"kind": kind}) for kind in set(ADMITTED.values())}


def _is(value, kind):
    return isinstance(value, _RECORDS[kind])


def _is_class(value, kind):
    return value is _RECORDS[kind]


def _int(value, what):
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Malformed(f"{what} is {value!r}, not an integer")
    return value


def _shape(value, what):
    if not isinstance(value, tuple) or not all(_int(n, what) >= 0 for n in value):
        raise _Malformed(f"{what} {value!r} is not a tuple of non-negative integers")
    return value


def _dtype(record):
    """The NumPy dtype a `numpy.dtype(spec, ...)` record plus its BUILD state describe."""
    if not _is(record, "dtype") or not record.args or not isinstance(record.args[0], str):
        raise _Malformed(f"expected a NumPy dtype, found {type(record).__name__}")
    spec = record.args[0]
    if not _DTYPE_SPEC.match(spec):
        raise _Malformed(f"NumPy dtype {spec!r} is not admitted (bool, integers, floats and "
                         "objects only)")
    state = record.state
    if (not isinstance(state, tuple) or len(state) < 5 or state[1] not in ("<", ">", "|", "=")
            or any(s is not None for s in state[2:5])):
        raise _Malformed(f"NumPy dtype {spec!r} has an unexpected state {state!r}")
    return np.dtype(spec).newbyteorder(state[1]) if spec[0] != "O" else np.dtype(object)


def _from_bytes(data, dtype, shape, what, order="C"):
    """A read-only array over `data`, after checking its length fits `shape` exactly."""
    if not isinstance(data, (bytes, bytearray)):
        raise _Malformed(f"{what}: expected raw bytes, found {type(data).__name__}")
    if dtype.hasobject:
        raise _Malformed(f"{what}: object arrays cannot come from raw bytes")
    count = int(np.prod(shape, dtype=object))
    if len(data) != count * dtype.itemsize:
        raise _Malformed(f"{what}: shape {shape} of {dtype} needs {count * dtype.itemsize} "
                         f"bytes, the file holds {len(data)}")
    return np.frombuffer(bytes(data), dtype, count).reshape(shape, order=order)


# --- the globals that produce plain values while unpickling ------------------------------------


def _slice(*args):
    if not 1 <= len(args) <= 3:
        raise _Malformed(f"slice{args!r}")
    for bound in args:
        if bound is not None:
            _int(bound, "slice bound")
    return slice(*args)


def _scalar(dtype, data):
    dtype = _dtype(dtype)
    return _from_bytes(data, dtype, (), "NumPy scalar")[()]


def _frombuffer(data, dtype, shape, order):
    if order not in ("C", "F"):
        raise _Malformed(f"array order {order!r}")
    return _from_bytes(data, _dtype(dtype), _shape(shape, "array shape"), "array", order)


def _py_buffer(data):
    if not isinstance(data, (bytes, bytearray)):
        raise _Malformed(f"pyarrow buffer of {type(data).__name__}")
    return bytes(data)


def _type_for_alias(alias):
    if alias not in _ARROW_STRING_TYPES:
        raise _Malformed(f"pyarrow type {alias!r} is not admitted (string types only)")
    return ("arrow_type", alias)


def _restore_array(data):
    """A pyarrow string array's (type, length, null_count, offset, buffers, children,
    dictionary), decoded into a tuple of str after checking every offset against the data."""
    if not isinstance(data, tuple) or len(data) != 7:
        raise _Malformed("pyarrow array state is not a 7-tuple")
    arrow_type, length, nulls, offset, buffers, children, dictionary = data
    if not (isinstance(arrow_type, tuple) and arrow_type[:1] == ("arrow_type", )):
        raise _Malformed("pyarrow array without a string type")
    width = _ARROW_STRING_TYPES[arrow_type[1]]
    length, offset = _int(length, "pyarrow array length"), _int(offset, "pyarrow offset")
    if nulls != 0 or children or dictionary is not None:
        raise _Malformed("pyarrow string array with nulls, children or a dictionary")
    if (not isinstance(buffers, list) or len(buffers) != 3
            or not all(isinstance(b, bytes) for b in buffers[1:])):
        raise _Malformed("pyarrow string array without offset and data buffers")
    if length < 0 or offset < 0 or (offset + length + 1) * width > len(buffers[1]):
        raise _Malformed(f"pyarrow string array of {length} strings at offset {offset} has "
                         f"only {len(buffers[1])} bytes of offsets")
    offsets = np.frombuffer(buffers[1], f"<i{width}", length + 1, offset * width)
    text = buffers[2]
    if length and (offsets[0] < 0 or offsets[-1] > len(text) or (np.diff(offsets) < 0).any()):
        raise _Malformed(f"pyarrow string offsets {offsets.min()}..{offsets.max()} point "
                         f"outside its {len(text)}-byte data buffer")
    try:
        return tuple(text[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:]))
    except UnicodeDecodeError as e:
        raise _Malformed(f"pyarrow string is not UTF-8 ({e})") from None


_FUNCTIONS = {
    "slice": _slice, "scalar": _scalar, "frombuffer": _frombuffer, "py_buffer": _py_buffer,
    "type_for_alias": _type_for_alias, "restore_array": _restore_array
}


class _RestrictedUnpickler(BoundedUnpickler):
    """Resolves ADMITTED globals to records or checked functions; refuses everything else."""

    def __init__(self, data, path):
        super().__init__(data)
        self._path = path

    def find_class(self, module, name):
        kind = ADMITTED.get((module, name))
        if kind is None:
            raise DataError(
                self._path, f"refusing to unpickle global {module}.{name}: only "
                "pandas/numpy reconstruction globals are allowed in data files")
        return _FUNCTIONS.get(kind) or _RECORDS[kind]

    def persistent_load(self, pid):
        raise DataError(self._path, "persistent ids are not allowed in data files")


# --- records → columns --------------------------------------------------------------------------


def _array(value, what):
    """A NumPy array from `_frombuffer` or a `_reconstruct` record with its BUILD state."""
    if isinstance(value, np.ndarray):
        return value
    if not (_is(value, "reconstruct") and value.args and _is_class(value.args[0], "ndarray")):
        raise _Malformed(f"{what}: expected a NumPy array, found {type(value).__name__}")
    state = value.state
    if not isinstance(state, tuple) or len(state) != 5:
        raise _Malformed(f"{what}: NumPy array without its state")
    _, shape, dtype, fortran, raw = state
    shape, dtype, order = _shape(shape, f"{what} shape"), _dtype(dtype), "F" if fortran else "C"
    if not dtype.hasobject:
        return _from_bytes(raw, dtype, shape, what, order)
    count = int(np.prod(shape, dtype=object))
    if not isinstance(raw, list) or len(raw) != count:
        raise _Malformed(f"{what}: object array of shape {shape} needs {count} values, the "
                         f"file holds {len(raw) if isinstance(raw, list) else 'none'}")
    array = np.empty(count, object)
    for i, item in enumerate(raw):  # One by one: a list item must stay one value.
        array[i] = item
    return array.reshape(shape, order=order)


def _index(value, what):
    """(length, labels) of a pickled Index/RangeIndex; a RangeIndex stays a `range`."""
    if not (_is(value, "new_index") and len(value.args) == 2 and isinstance(value.args[1], dict)):
        raise _Malformed(f"{what}: expected a pandas Index, found {type(value).__name__}")
    cls, fields = value.args
    if _is_class(cls, "RangeIndex"):
        bounds = [_int(fields.get(k), f"{what} {k}") for k in ("start", "stop", "step")]
        if bounds[2] == 0:
            raise _Malformed(f"{what}: RangeIndex with step 0")
        labels = range(*bounds)
        return len(labels), labels
    if not _is_class(cls, "Index"):
        raise _Malformed(f"{what}: index type {type(cls).__name__} is not admitted")
    data = fields.get("data")
    if _is(data, "ArrowStringArray"):
        state = data.state if isinstance(data.state, dict) else {}
        strings = state.get("_pa_array", state.get("_data"))  # pandas 3, pandas 2.0
        if not isinstance(strings, tuple):
            raise _Malformed(f"{what}: string array without its pyarrow data")
        return len(strings), list(strings)
    labels = _array(data, what)
    if labels.ndim != 1:
        raise _Malformed(f"{what}: index of shape {labels.shape}")
    return len(labels), labels


def _placement(value, width, what):
    """The column positions a block's `placement` (slice or int array) names."""
    if isinstance(value, slice):
        step = 1 if value.step is None else value.step
        positions = range(value.start or 0, width if value.stop is None else value.stop, step)
        if step == 0 or (len(positions)
                         and not (0 <= positions[0] < width and 0 <= positions[-1] < width)):
            raise _Malformed(f"{what}: placement {value} reaches outside the {width} columns")
        return list(positions)
    positions = _array(value, what)
    if positions.ndim != 1 or positions.dtype.kind not in "iu":
        raise _Malformed(f"{what}: placement is not a list of column positions")
    if len(positions) and (positions.min() < 0 or positions.max() >= width):
        raise _Malformed(f"{what}: placement outside the {width} columns")
    return positions.tolist()


def _frame(root):
    """(column names, {name: 1-D array}, row labels) of a DataFrame record."""
    if not _is(root, "DataFrame"):
        raise _Malformed(f"expected a pandas DataFrame, found {type(root).__name__}")
    state = root.state if isinstance(root.state, dict) else {}
    manager = state.get("_mgr")
    if root.args or not (_is(manager, "BlockManager") and len(manager.args) == 2):
        raise _Malformed("DataFrame without a block manager (pandas 1.4 or later writes one)")
    blocks, axes = manager.args
    if not isinstance(blocks, (tuple, list)) or not isinstance(axes, list) or len(axes) != 2:
        raise _Malformed("block manager without blocks and two axes")
    width, names = _index(axes[0], "column index")
    rows, labels = _index(axes[1], "row index")
    if width == 0:
        raise _Malformed("DataFrame without columns")
    if not all(isinstance(n, str) for n in names) or len(set(names)) != width:
        raise _Malformed(f"column names {list(names)[:10]} are not distinct strings")
    columns = {}
    for b, block in enumerate(blocks):
        what = f"block {b}"
        if not (_is(block, "block") and len(block.args) == 3 and block.args[2] == 2):
            raise _Malformed(f"{what} is not a 2-D pandas block")
        values, placement, _ = block.args
        values = _array(values, what)
        positions = _placement(placement, width, what)
        if values.shape != (len(positions), rows):
            raise _Malformed(f"{what} holds values of shape {values.shape}, but the frame "
                             f"has {rows} rows and the block {len(positions)} columns")
        for position, column in zip(positions, values):
            if names[position] in columns:
                raise _Malformed(f"column {names[position]!r} is in two blocks")
            columns[names[position]] = column
    missing = [n for n in names if n not in columns]
    if missing:
        raise _Malformed(f"column(s) {missing} have no values")
    return list(names), columns, labels


def load_dataframe(path):
    """Reads a pandas DataFrame pickle without running it (see the module docstring).

    Raises DataError naming the file for a missing, truncated, non-pickle or non-DataFrame file,
    a global outside ADMITTED, or records whose sizes, types or offsets do not add up.
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
        root = _RestrictedUnpickler(data, path).load()
        names, columns, labels = _frame(root)
    except DataError:
        raise
    except (EOFError, pickle.UnpicklingError) as e:
        raise DataError(path, f"truncated or corrupt pickle ({e})") from e
    except _Malformed as e:
        raise DataError(path, f"malformed DataFrame pickle: {e}") from None
    except Exception as e:  # pylint: disable=broad-except
        # Opcodes applied to the wrong kind of value (e.g. APPENDS on a record).
        raise DataError(path, f"malformed pickle ({type(e).__name__}: {e})") from e
    index = (pd.RangeIndex(labels.start, labels.stop, labels.step)
             if isinstance(labels, range) else pd.Index(labels))
    return pd.DataFrame({name: columns[name] for name in names}, index=index, copy=False)
