"""The restricted unpickler: real frames load; anything else is refused, nothing executed."""

import pickle

import numpy as np
import pandas as pd
import pytest

from conftest import RunsShellWhenUnpickled
from rsllm_jax.data.errors import DataError
from rsllm_jax.data.safe_pickle import load_dataframe


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
    (tmp_path / "cut.df").write_bytes(data[: len(data) // 2])
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
