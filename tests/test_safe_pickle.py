"""The restricted unpickler: real frames load; anything else is refused, nothing executed."""

import copyreg
import io
import os
import pickle
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import RunsShellWhenUnpickled
from rsllm_jax.data.errors import DataError
from rsllm_jax.data.safe_pickle import load_dataframe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_round_trip_of_llara_style_frames(tmp_path):
    frame = pd.DataFrame({"seq": [[1, 2, 40], [3, 40, 40]], "len_seq": [2, 1], "next": [5, 6]})
    frame.to_pickle(tmp_path / "a.df")
    loaded = load_dataframe(tmp_path / "a.df")
    pd.testing.assert_frame_equal(loaded, frame)


def test_movielens_tuples_with_numpy_scalars(tmp_path):
    pairs = [[(np.int64(3), np.int64(4)), (np.int64(1682), np.int64(0))]]
    frame = pd.DataFrame({"seq": pairs, "len_seq": [1], "next": [(np.int64(7), np.int64(5))]})
    frame.to_pickle(tmp_path / "m.df")
    loaded = load_dataframe(tmp_path / "m.df")
    assert loaded["seq"][0] == [(3, 4), (1682, 0)]
    assert loaded["next"][0] == (7, 5)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_os_system_is_refused_and_not_executed(tmp_path, protocol):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.df"
    path.write_bytes(pickle.dumps(RunsShellWhenUnpickled(marker), protocol=protocol))
    with pytest.raises(DataError) as error:
        load_dataframe(path)
    assert str(path) in str(error.value)
    assert "system" in str(error.value)  # posix.system or os.system, named in the message.
    assert not marker.exists()


def test_global_hidden_inside_a_frame_is_refused(tmp_path):
    marker = tmp_path / "executed"
    frame = pd.DataFrame({"seq": [RunsShellWhenUnpickled(marker)], "len_seq": [1], "next": [0]})
    path = tmp_path / "hidden.df"
    path.write_bytes(pickle.dumps(frame))
    with pytest.raises(DataError, match="refusing to unpickle global"):
        load_dataframe(path)
    assert not marker.exists()


def test_builtins_eval_is_refused(tmp_path):
    path = tmp_path / "eval.df"
    path.write_bytes(b"\x80\x04cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(DataError, match=r"builtins\.eval"):
        load_dataframe(path)


def test_truncated_pickle(tmp_path):
    pd.DataFrame({"seq": [[1]], "len_seq": [1], "next": [2]}).to_pickle(tmp_path / "full.df")
    data = (tmp_path / "full.df").read_bytes()
    (tmp_path / "cut.df").write_bytes(data[:len(data) // 2])
    with pytest.raises(DataError, match="cut.df.*(truncated|malformed)"):
        load_dataframe(tmp_path / "cut.df")


def test_not_a_pickle(tmp_path):
    (tmp_path / "text.df").write_text("seq,len_seq,next\n1,1,2\n")
    with pytest.raises(DataError, match="text.df: not a pickle"):
        load_dataframe(tmp_path / "text.df")


def test_pickle_that_is_not_a_frame(tmp_path):
    (tmp_path / "list.df").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DataError, match="expected a pandas DataFrame, found list"):
        load_dataframe(tmp_path / "list.df")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.df: cannot read file"):
        load_dataframe(tmp_path / "nope.df")


# --- crafted files built only from admitted globals ------------------------------------------


class Reduce:
    """Pickled (by `_dumps`) as the given `__reduce__` value: crafted calls of admitted globals."""

    def __init__(self, *value):
        self.value = value


class _Crafter(pickle._Pickler):  # The Python pickler: it lets a NEWOBJ name any class.
    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[Reduce] = lambda self, obj: self.save_reduce(*obj.value, obj=None)


def _dumps(obj):
    out = io.BytesIO()
    _Crafter(out, protocol=5).dump(obj)
    return out.getvalue()


def _index(cls, **fields):
    return Reduce(pd.core.indexes.base._new_Index, (cls, dict(name=None, **fields)))


def _frame_pickle(blocks, columns, rows):
    """A DataFrame pickle laid out as pandas writes one, from the given blocks and axes."""
    manager = Reduce(pd.core.internals.managers.BlockManager, (tuple(blocks), [columns, rows]))
    return _dumps(Reduce(copyreg.__newobj__, (pd.DataFrame, ), {"_mgr": manager}))


def _block(values, columns):
    return Reduce(pd._libs.internals._unpickle_block, (values, slice(*columns), 2))


COLUMNS = _index(pd.Index, data=np.array(["seq", "len_seq", "next"], object))


def test_crafted_frame_layout_loads_like_pandas(tmp_path):
    """The crafting helpers write what pandas writes: the same frame comes back."""
    seqs = np.empty((1, 2), object)
    seqs[0] = [[1, 2], [3]]
    path = tmp_path / "crafted.df"
    path.write_bytes(
        _frame_pickle([_block(seqs, (0, 1, 1)),
                       _block(np.array([[2, 1], [5, 6]]), (1, 3, 1))], COLUMNS,
                      _index(pd.RangeIndex, start=0, stop=2, step=1)))
    frame = load_dataframe(path)
    assert frame["seq"].tolist() == [[1, 2], [3]] and frame["next"].tolist() == [5, 6]


@pytest.mark.parametrize("last_offset", [20, 4096, 1 << 40])
def test_arrow_string_offsets_past_their_buffer_are_refused(tmp_path, last_offset):
    """pandas 3 writes column names as a pyarrow string array; offsets past its data buffer
    crashed the process (SIGSEGV / abort) when pyarrow rebuilt it."""
    frame = pd.DataFrame({"seq": [[1, 2, 40]], "len_seq": [2], "next": [5]})
    data = pickle.dumps(frame, protocol=5)
    good = np.array([0, 3, 10, 14], np.int64).tobytes()  # "seq" "len_seq" "next"
    assert data.count(good) == 1
    path = tmp_path / "offsets.df"
    path.write_bytes(data.replace(good, np.array([0, 3, 10, last_offset], np.int64).tobytes()))
    with pytest.raises(DataError, match=r"offsets.df: .*offsets .* outside its 14-byte data"):
        load_dataframe(path)


# Each asks for 10^8 rows in a few hundred bytes. Loaded in a child process whose address space
# is capped at 1 GiB, so a reader that allocates first fails there instead of exhausting this
# machine; the child also reports its peak traced allocation.
_HUGE = 10**8
_ROWS = _index(pd.RangeIndex, start=0, stop=_HUGE, step=1)
_SIZE_ATTACKS = {
    "no_blocks": _frame_pickle([], COLUMNS, _ROWS),
    "blocks_shorter_than_index": _frame_pickle([_block(np.zeros((3, 1), np.int64), (0, 3, 1))],
                                               COLUMNS, _ROWS),
    "constructor_call": _dumps(Reduce(pd.DataFrame, (0, _ROWS, ["seq"]))),
    # CPython's C unpickler allocates a memo array up to any index a PUT names (2 GiB here)
    # and a bytearray of any length BYTEARRAY8 declares.
    "memo_index": b"\x80\x04N" + b"r" + (1 << 28).to_bytes(4, "little") + b".",
    "bytearray_length": b"\x80\x05\x96" + (6 << 30).to_bytes(8, "little") + b".",
    "huge_object_array": _frame_pickle([
        _block(
            Reduce(
                np.ndarray.__reduce__(np.zeros(0))[0], (np.ndarray, (0, ), b"b"),
                (1, (3, _HUGE), np.dtype(object), False, [])), (0, 3, 1))
    ], COLUMNS, _ROWS),
}
_CHILD = """
import resource, sys, tracemalloc
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from rsllm_jax.data.errors import DataError
from rsllm_jax.data.safe_pickle import load_dataframe
import pandas  # Imported before tracing: only the reader's own allocations count.
tracemalloc.start()
try:
    load_dataframe(sys.argv[1])
    print("loaded")
except DataError as e:
    print(f"{tracemalloc.get_traced_memory()[1]} {e}")
"""


@pytest.mark.parametrize("attack", sorted(_SIZE_ATTACKS))
def test_declared_sizes_are_checked_before_allocating(tmp_path, attack):
    path = tmp_path / f"{attack}.df"
    path.write_bytes(_SIZE_ATTACKS[attack])
    assert len(_SIZE_ATTACKS[attack]) < 1500, "a few hundred bytes"
    done = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    peak, message = done.stdout.strip().split(" ", 1)
    assert message.startswith(f"{path}: "), message
    assert "MemoryError" not in message
    assert int(peak) < 1 << 20, f"{attack}: the reader allocated {int(peak) >> 20} MiB"
