"""The prepare step on small LLaRA-format folders: counts, formats, resume, bad input."""

import json
import os
import shutil

import numpy as np
import pytest

from conftest import shared_data_root, write_llara_frame
from rsllm_jax.data import prepare as prepare_lib
from rsllm_jax.data.errors import DataError
from rsllm_jax.data.pipeline import BatchIterator
from rsllm_jax.data.storage import PreparedDataset


def test_lastfm_like_folder(lastfm_source, tmp_path):
    out = tmp_path / "prepared"
    manifest = prepare_lib.prepare("lastfm", str(lastfm_source), str(out))
    # 24 train prefix rows; those with < 3 history items (3 per user) are dropped.
    assert manifest["splits"]["train"] == dict(rows_read=24, dropped_short=9, rows=15, sequences=3,
                                               interactions=24)
    assert manifest["splits"]["val"]["rows"] == 2
    assert manifest["splits"]["test"] == dict(rows_read=2, dropped_short=1, rows=1, sequences=2,
                                              interactions=7)
    dataset = PreparedDataset(str(out))
    assert dataset.catalogue.titles[7] == "Depths of Fear :: Knossos"
    assert dataset.catalogue.domain == "artists" and dataset.catalogue.pad_id == 40
    val = dataset.read("val")
    assert val["history"][1].tolist() == [5, 6, 7, 8] + [40] * 6
    assert val["row_id"].tolist() == [0, 1] and val["target"].tolist() == [4, 9]
    for candidates, history, length, target in zip(val["candidates"], val["history"],
                                                   val["history_len"], val["target"]):
        assert (candidates == target).sum() == 1 and len(set(candidates.tolist())) == 20
        assert not set(candidates.tolist()) & set(history[:length].tolist())
    assert (dataset.read("train")["candidates"] == -1).all()
    assert dataset.read("test")["row_id"].tolist() == [1]  # Row ids survive the filter.


def test_val_test_candidates_are_fixed_by_the_seed(lastfm_source, tmp_path):
    read = lambda d: PreparedDataset(str(d)).read("val")["candidates"]
    prepare_lib.prepare("lastfm", str(lastfm_source), str(tmp_path / "a"))
    prepare_lib.prepare("lastfm", str(lastfm_source), str(tmp_path / "b"))
    prepare_lib.prepare("lastfm", str(lastfm_source), str(tmp_path / "c"), candidate_seed=1)
    np.testing.assert_array_equal(read(tmp_path / "a"), read(tmp_path / "b"))
    assert (read(tmp_path / "a") != read(tmp_path / "c")).any()


def test_rerun_skips_and_other_settings_are_refused(lastfm_source, tmp_path):
    out = str(tmp_path / "prepared")
    prepare_lib.prepare("lastfm", str(lastfm_source), out)
    stamp = os.path.getmtime(os.path.join(out, "dataset.json"))
    prepare_lib.prepare("lastfm", str(lastfm_source), out)
    assert os.path.getmtime(os.path.join(out, "dataset.json")) == stamp
    with pytest.raises(DataError, match="already holds lastfm prepared with settings"):
        prepare_lib.prepare("lastfm", str(lastfm_source), out, min_history=5)


def test_rerun_from_other_source_files_is_refused(lastfm_source, tmp_path):
    out = str(tmp_path / "prepared")
    manifest = prepare_lib.prepare("lastfm", str(lastfm_source), out)
    assert manifest["source_files"]["val"]["file"] == "Val_data.df"
    copy = tmp_path / "copy"
    shutil.copytree(lastfm_source, copy)  # The same files elsewhere: reused.
    assert prepare_lib.prepare("lastfm", str(copy), out)["splits"] == manifest["splits"]
    write_llara_frame(copy / "Val_data.df", [([1, 2, 3], 4)], pad_id=40)  # Fewer rows.
    with pytest.raises(
            DataError, match=r"prepared: was prepared from other source files; "
            r"differing: val \(Val_data.df → Val_data.df\)"):
        prepare_lib.prepare("lastfm", str(copy), out)
    (copy / "Test_data.df").unlink()
    with pytest.raises(DataError, match=r"test \(Test_data.df → absent\), val"):
        prepare_lib.prepare("lastfm", str(copy), out)
    with pytest.raises(DataError, match=r"nowhere: source folder does not exist"):
        prepare_lib.prepare("lastfm", str(tmp_path / "nowhere"), out)


@pytest.mark.parametrize("make_out", ["file", "under_a_file", "read_only"])
def test_unwritable_output_fails_before_reading_input(lastfm_source, tmp_path, make_out):
    if make_out == "read_only" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    blocker = tmp_path / "taken"
    blocker.write_text("")
    out = {"file": blocker, "under_a_file": blocker / "prepared"}.get(make_out)
    if make_out == "read_only":
        (tmp_path / "locked").mkdir(mode=0o555)
        out = tmp_path / "locked" / "prepared"
    # Unreadable input would be reported first if it were read first.
    (lastfm_source / "train_data.df").write_text("not a pickle")
    with pytest.raises(DataError, match=r"cannot (be|write) the output folder"):
        prepare_lib.prepare("lastfm", str(lastfm_source), str(out))


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_corrupt_shard_is_named(lastfm_source, tmp_path, damage):
    out = tmp_path / "prepared"
    prepare_lib.prepare("lastfm", str(lastfm_source), str(out))
    [shard] = out.glob("tfds/**/*-train.array_record-*")
    data = bytearray(shard.read_bytes())
    if damage == "flipped":
        data[100:164] = bytes(64)
    else:
        data = data[:len(data) // 2]
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{shard}: corrupt train data \(.*\); prepare the "
                       "data again"):
        PreparedDataset(str(out)).read("train")


def test_min_history_is_configurable(lastfm_source, tmp_path):
    manifest = prepare_lib.prepare("lastfm", str(lastfm_source), str(tmp_path / "p"), min_history=0)
    assert manifest["splits"]["train"]["rows"] == 24


def test_steam_without_train_split(lastfm_source, tmp_path):
    (lastfm_source / "train_data.df").unlink()
    out = str(tmp_path / "prepared")
    manifest = prepare_lib.prepare("steam", str(lastfm_source), out)
    assert sorted(manifest["splits"]) == ["test", "val"]
    dataset = PreparedDataset(out)
    assert dataset.catalogue.domain == "games"
    with pytest.raises(DataError, match="split 'train' was not prepared"):
        dataset.source("train")


def test_other_train_file_name(lastfm_source, tmp_path):
    (lastfm_source / "train_data.df").rename(lastfm_source / "train_data.sample.df")
    manifest = prepare_lib.prepare("steam", str(lastfm_source), str(tmp_path / "p"),
                                   train_file="train_data.sample.df")
    assert manifest["splits"]["train"]["rows_read"] == 24


@pytest.mark.parametrize("remove, message", [
    ("id2name.txt", "source folder has no title file"),
    ("*.df", "source folder has none of"),
])
def test_source_folder_without_expected_files(lastfm_source, tmp_path, remove, message):
    for path in lastfm_source.glob(remove):
        path.unlink()
    with pytest.raises(DataError, match=message):
        prepare_lib.prepare("lastfm", str(lastfm_source), str(tmp_path / "p"))
    with pytest.raises(DataError, match="source folder does not exist"):
        prepare_lib.prepare("lastfm", str(tmp_path / "nowhere"), str(tmp_path / "p"))


def test_bad_file_writes_nothing(lastfm_source, tmp_path):
    write_llara_frame(lastfm_source / "Test_data.df", [([1, 2, 3], 77)], pad_id=40)
    out = tmp_path / "prepared"
    with pytest.raises(DataError, match=r"Test_data.df, row 0: next: item id 77 has no title"):
        prepare_lib.prepare("lastfm", str(lastfm_source), str(out))
    assert not (out / "dataset.json").exists()


def test_title_missing_for_an_id_in_the_data(lastfm_source, tmp_path):
    lines = (lastfm_source / "id2name.txt").read_bytes().splitlines(keepends=True)
    (lastfm_source / "id2name.txt").write_bytes(b"".join(lines[:30]))  # Ids 30..39 lose titles.
    with pytest.raises(
            DataError, match=r"id2name.txt: lists 30 items, but train_data.df pads "
            r"histories with id 40 .* lacks ids 30..39"):
        prepare_lib.prepare("lastfm", str(lastfm_source), str(tmp_path / "p"))


def test_extra_title_is_blamed_on_the_title_file(lastfm_source, tmp_path):
    with open(lastfm_source / "id2name.txt", "ab") as f:
        f.write(b"40::One Artist Too Many\r\n")
    with pytest.raises(
            DataError, match=r"id2name.txt: lists 41 items, but train_data.df pads "
            r"histories with id 40 .* has 1 more item\(s\)"):
        prepare_lib.prepare("lastfm", str(lastfm_source), str(tmp_path / "p"))


def _movielens_source(root):
    """u.item/u.data for 6 users of 12 ratings each, LLaRA val/test rows for users 1 and 2."""
    root.mkdir()
    titles = [f"Movie {i}, The ({1990 + i % 9})" for i in range(40)]
    titles[5] = "unknown"  # Like ml-100k's item 267: no title at all.
    (root / "u.item").write_bytes("".join(f"{i + 1}|{t}|x||url|0\n"
                                          for i, t in enumerate(titles)).encode("latin-1"))
    rng = np.random.default_rng(0)
    lines, sequences = [], {}
    for user in range(6):
        items = rng.choice(40, 14, replace=False)
        ratings = [int(r) for r in rng.integers(1, 6, 14)]
        for t, (item, rating) in enumerate(zip(items, ratings)):
            lines.append(f"{user + 1}\t{item + 1}\t{rating}\t{1000 + t}\n")
        sequences[user] = [(int(i), r) for i, r in zip(items, ratings) if r >= 3]
    (root / "u.data").write_text("".join(lines))
    llara = root / "llara"
    llara.mkdir()
    for name, user in (("Val_data.df", 1), ("Test_data.df", 2)):
        pairs = sequences[user]
        import pandas as pd
        seq = [list(pairs[-11:-1]) + [(40, 0)] * (10 - len(pairs[-11:-1]))]
        pd.DataFrame({"seq": seq, "len_seq": [len(pairs[-11:-1])],
                      "next": [pairs[-1]]}).to_pickle(llara / name)
    return sequences


def test_movielens_rebuilds_train_from_the_other_users(tmp_path):
    sequences = _movielens_source(tmp_path / "ml")
    manifest = prepare_lib.prepare("movielens", str(tmp_path / "ml"), str(tmp_path / "p"))
    train_users = [u for u in sequences if u not in (1, 2)]
    assert manifest["splits"]["train"]["rows_read"] == sum(len(sequences[u]) for u in train_users)
    assert manifest["splits"]["train"]["sequences"] == 4
    assert manifest["splits"]["val"]["interactions"] == len(sequences[1])
    dataset = PreparedDataset(str(tmp_path / "p"))
    assert dataset.catalogue.titles[3] == "The Movie 3"
    assert dataset.catalogue.empty_title_ids == (5, )
    # The empty title would match any answer: never a negative, in val/test or in training.
    for split in ("val", "test"):
        rows = dataset.read(split)
        assert not (rows["candidates"] == 5).any() or (rows["target"] == 5).any()
    train = next(BatchIterator(dataset, "train", 64, process_index=0, process_count=1))
    assert not ((train["candidates"] == 5) & (train["target"][:, None] != 5)).any()
    raw = prepare_lib.prepare("movielens", str(tmp_path / "ml"), str(tmp_path / "raw"),
                              movielens_split="raw")
    assert sum(s["sequences"] for s in raw["splits"].values()) == 6


def test_synthetic_dataset_and_stats(tmp_path):
    from rsllm_jax.data.stats import dataset_stats, format_stats
    manifest = prepare_lib.prepare("synthetic", "", str(tmp_path / "p"),
                                   synthetic=dict(num_users=100, num_items=80))
    stats = dataset_stats(str(tmp_path / "p"))
    assert stats["sequences"] == 100 and stats["items"] == 80
    assert stats["interactions"] == sum(s["interactions"] for s in manifest["splits"].values())
    assert stats["sparsity"] == pytest.approx(1 - stats["interactions"] / (100 * 80))
    assert "# sequences    100" in format_stats(stats)


@pytest.mark.skipif(shared_data_root() is None, reason="set RSLLM_DATA_ROOT to the real data")
def test_real_lastfm_counts(tmp_path):
    root = shared_data_root()
    manifest = prepare_lib.prepare("lastfm", os.path.join(root, "lastfm", "llara"),
                                   str(tmp_path / "lastfm"))
    assert [manifest["splits"][s]["rows"] for s in ("train", "val", "test")] == [47872, 122, 122]
    assert manifest["num_items"] == 4606
    json.dumps(manifest)


def test_a_folder_prepared_before_new_settings_existed_is_reused(tmp_path):
    """A manifest that lacks settings added later (they have their defaults) is not refused."""
    import json

    out = tmp_path / "old"
    prepare_lib.prepare("synthetic", "", str(out), synthetic=dict(num_users=40))
    manifest_file = out / "dataset.json"
    manifest = json.loads(manifest_file.read_text())
    del manifest["settings"]["distinct_candidate_titles"]
    del manifest["settings"]["synthetic"]["items_per_title"]
    manifest_file.write_text(json.dumps(manifest))
    reused = prepare_lib.prepare("synthetic", "", str(out), synthetic=dict(num_users=40))
    assert json.loads(manifest_file.read_text()) == manifest  # Reused as it is, not rewritten.
    # Readers see the settings complete, with the defaults the folder was prepared under.
    for settings in (reused["settings"], PreparedDataset(str(out)).manifest["settings"]):
        assert settings["distinct_candidate_titles"] is False
        assert settings["synthetic"]["items_per_title"] == 1
        assert settings["synthetic"]["num_users"] == 40
    with pytest.raises(DataError, match="already holds synthetic prepared with settings"):
        prepare_lib.prepare("synthetic", "", str(out), distinct_candidate_titles=True,
                            synthetic=dict(num_users=40))
