"""LLaRA split reader, MovieLens raw reader, row building and every bad row."""

import numpy as np
import pandas as pd
import pytest

from conftest import prefix_rows, write_llara_frame
from rsllm_jax.data import sources
from rsllm_jax.data.errors import DataError


def test_reads_rows_and_infers_user_sequences(tmp_path):
    path = tmp_path / "train_data.df"
    rows = prefix_rows(list(range(0, 13))) + prefix_rows([20, 21, 22])
    write_llara_frame(path, rows, pad_id=30)
    split = sources.read_llara_split(path, num_items=30, infer_sequences=True)
    assert len(split) == 16
    assert split.history_len.tolist()[:3] == [0, 1, 2] and split.history_len[12] == 10
    assert split.history[12].tolist() == list(range(2, 12)) and split.target[12] == 12
    assert split.history[1].tolist() == [0] + [30] * 9
    assert split.sequence.tolist() == [0] * 13 + [1] * 3
    assert split.num_sequences == 2
    kept, dropped = sources.drop_short_histories(split, 3)
    assert dropped == 6 and len(kept) == 10 and kept.history_len.min() == 3
    assert kept.row_id.tolist() == [3, 4, 5, 6, 7, 8, 9, 10, 11, 12]


def _frame(path, seq, len_seq, nxt, columns=("seq", "len_seq", "next")):
    frame = pd.DataFrame({"seq": seq, "len_seq": len_seq, "next": nxt})
    frame[list(columns)].to_pickle(path)


@pytest.mark.parametrize("seq, len_seq, nxt, message", [
    ([[1, 2, 99] + [30] * 7], [2], [3], r"row 0: seq: item id 99 has no title"),
    ([[1, -2] + [30] * 8], [2], [3], r"row 0: seq: negative item id -2"),
    ([[1, 2] + [30] * 8], [2], [30], r"row 0: next: item id 30 has no title"),
    ([[1, 2] + [30] * 8], [2], [-1], r"row 0: next: negative item id -1"),
    ([list(range(11))], [10], [12], r"row 0: seq: history has 11 entries, more than 10"),
    ([[1, 30, 2] + [30] * 7], [2], [3], r"row 0: seq: item after padding"),
    ([[1, 2] + [30] * 8], [5], [3], r"row 0: len_seq is 5 but seq holds 2 items"),
    ([[1, "a"] + [30] * 8], [2], [3], r"row 0: seq: item id 'a' is not an integer"),
])
def test_bad_rows_name_file_row_and_problem(tmp_path, seq, len_seq, nxt, message):
    path = tmp_path / "Val_data.df"
    _frame(path, seq, len_seq, nxt)
    with pytest.raises(DataError, match="Val_data.df, " + message):
        sources.read_llara_split(path, num_items=30)


def test_error_names_the_offending_row(tmp_path):
    path = tmp_path / "Test_data.df"
    _frame(path, [[1, 2] + [30] * 8] * 3, [2, 2, 2], [3, 4, 31])
    with pytest.raises(DataError, match=r"Test_data.df, row 2: next: item id 31"):
        sources.read_llara_split(path, num_items=30)


@pytest.mark.parametrize("len_seq, nxt, message", [
    ([2, np.nan, 2], [3, 4, 5], r"row 1: len_seq is missing \(NaN\)"),
    ([2, 2, 2], [3, 4, np.nan], r"row 2: next: item id is missing \(NaN\)"),
    ([2, 2, 2.5], [3, 4, 5], r"row 2: len_seq 2.5 is not an integer"),
])
def test_missing_values_name_their_row(tmp_path, len_seq, nxt, message):
    """A NaN turns a whole pandas column to float: its other rows still read, and the error
    names the row that holds it."""
    path = tmp_path / "Val_data.df"
    _frame(path, [[1, 2] + [30] * 8] * 3, len_seq, nxt)
    with pytest.raises(DataError, match="Val_data.df, " + message):
        sources.read_llara_split(path, num_items=30)


@pytest.mark.parametrize("num_items, message", [
    (31, r"titles.txt: lists 31 items, but Val_data.df pads histories with id 30 .* has 1 more "
     r"item\(s\) \(ids 30..30\)"),
    (28, r"titles.txt: lists 28 items, but Val_data.df pads histories with id 30 .* lacks ids "
     r"28..29"),
])
def test_padding_that_disagrees_with_the_catalogue_blames_the_title_file(
        tmp_path, num_items, message):
    path = tmp_path / "Val_data.df"
    _frame(path, [[1, 2] + [30] * 8], [2], [3])
    with pytest.raises(DataError, match=message):
        sources.read_llara_split(path, num_items=num_items, catalogue_file="titles.txt")


def test_missing_columns(tmp_path):
    path = tmp_path / "Val_data.df"
    _frame(path, [[1] + [30] * 9], [1], [2], columns=("seq", "next"))
    with pytest.raises(DataError, match=r"missing column\(s\) \['len_seq'\]"):
        sources.read_llara_split(path, num_items=30)


def test_movielens_pairs_keep_ratings(tmp_path):
    path = tmp_path / "Val_data.df"
    seq = [[(3, 4), (5, 3)] + [(30, 0)] * 8]
    _frame(path, seq, [2], [(7, 5)])
    split = sources.read_llara_split(path, num_items=30)
    assert split.history[0, :2].tolist() == [3, 5] and split.target[0] == 7
    assert split.history_rating[0, :2].tolist() == [4, 3] and split.target_rating[0] == 5


def test_movielens_ratings_sorted_by_time_and_filtered(tmp_path):
    path = tmp_path / "u.data"
    path.write_text("1\t3\t5\t300\n1\t1\t4\t100\n1\t2\t2\t200\n2\t4\t3\t50\n1\t5\t3\t100\n")
    users = sources.read_movielens_ratings(path, num_items=5)
    # Ratings below 3 are dropped; the timestamp tie (100) keeps the file's order.
    assert users == {0: [(0, 4), (4, 3), (2, 5)], 1: [(3, 3)]}
    path.write_text("1\t9\t5\t300\n")
    with pytest.raises(DataError, match=r"u.data, line 1: item id 9 has no title"):
        sources.read_movielens_ratings(path, num_items=5)
    path.write_text("1\t2\t5\n")
    with pytest.raises(DataError, match="expected 4 columns"):
        sources.read_movielens_ratings(path, num_items=5)


def test_rows_from_sequences_as_llara_builds_them():
    rows = sources.rows_from_sequences([[4, 5, 6], [7, 8]], pad_id=9)
    assert rows.target.tolist() == [4, 5, 6, 7, 8]
    assert rows.history_len.tolist() == [0, 1, 2, 0, 1]
    assert rows.history[2].tolist() == [4, 5] + [9] * 8
    assert rows.interactions == 5
    last = sources.rows_from_sequences([list(range(15))], pad_id=20, last_only=True)
    assert last.target.tolist() == [14] and last.history[0].tolist() == list(range(4, 14))


def test_match_rows_to_users_needs_exactly_one_user(tmp_path):
    users = {0: [(1, 4), (2, 5), (3, 3)], 1: [(1, 4), (2, 3), (3, 3)]}
    rows = sources.SplitRows(history=np.array([[1, 2] + [9] * 8]), history_len=np.array([2]),
                             target=np.array([3]), row_id=np.array([0]), sequence=np.array([0]),
                             history_rating=np.array([[4, 5] + [0] * 8]),
                             target_rating=np.array([3]))
    assert sources.match_rows_to_users(rows, users, "Val_data.df") == [0]
    users[2] = [(1, 4), (2, 5), (3, 3), (8, 4)]
    with pytest.raises(DataError, match="Val_data.df, row 0: matches 2 users"):
        sources.match_rows_to_users(rows, users, "Val_data.df")


def test_split_users_is_seeded_and_disjoint():
    a = sources.split_users(range(100), seed=3)
    assert a == sources.split_users(range(100), seed=3)
    assert a != sources.split_users(range(100), seed=4)
    assert [len(s) for s in a] == [80, 10, 10]
    assert sorted(a[0] + a[1] + a[2]) == list(range(100))
