"""Shared helpers: small LLaRA-format source folders built inside each test."""

import os

import pandas as pd
import pytest


class RunsShellWhenUnpickled:
    """A pickle payload that would run `touch marker`: unsafe loaders must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}", )


def write_llara_frame(path, rows, pad_id):
    """Writes a LLaRA-style DataFrame pickle; rows are (history list, next)."""
    seqs, lens, nexts = [], [], []
    for history, target in rows:
        seqs.append(list(history) + [pad_id] * (10 - len(history)))
        lens.append(max(len(history), 1))  # LLaRA writes 1 for an empty history.
        nexts.append(target)
    pd.DataFrame({"seq": seqs, "len_seq": lens, "next": nexts}).to_pickle(path)


def prefix_rows(sequence):
    """Every prefix of one user's sequence as (history, next) rows, as in LLaRA's train file."""
    return [(sequence[max(0, t - 10):t], sequence[t]) for t in range(len(sequence))]


@pytest.fixture
def lastfm_source(tmp_path):
    """A LastFM-like folder: 40 artists (CRLF titles), 3 train users, 2 val and 2 test rows."""
    source = tmp_path / "source"
    source.mkdir()
    titles = [f"Artist {i}" for i in range(40)]
    titles[7] = "Depths of Fear :: Knossos"
    (source / "id2name.txt").write_bytes("".join(f"{i}::{t}\r\n"
                                                 for i, t in enumerate(titles)).encode())
    users = [list(range(0, 14)), list(range(14, 20)), [30, 31, 32, 33]]
    train = [row for user in users for row in prefix_rows(user)]
    write_llara_frame(source / "train_data.df", train, pad_id=40)
    write_llara_frame(source / "Val_data.df", [([1, 2, 3], 4), ([5, 6, 7, 8], 9)], pad_id=40)
    write_llara_frame(source / "Test_data.df", [([10, 11], 12), ([20, 21, 22], 23)], pad_id=40)
    return source


def shared_data_root():
    """Folder with the real datasets, from $RSLLM_DATA_ROOT; None when unset."""
    root = os.environ.get("RSLLM_DATA_ROOT")
    return root if root and os.path.isdir(root) else None


# The slowest modules first: with one worker per file (pytest.ini), a long module that starts
# last leaves the other worker idle at the end of the run.
_SLOW_MODULES = ("test_multiprocess.py", "test_sharded_pipeline.py", "test_accelerator_smoke.py",
                 "test_pretrain.py", "test_object_store.py", "test_trainer.py",
                 "test_experiments.py", "test_recommend.py", "test_export.py", "test_sharding.py",
                 "test_sharded_train.py", "test_gguf.py", "test_rsllm_model.py")


def pytest_collection_modifyitems(items):

    def rank(item):
        name = item.path.name
        return _SLOW_MODULES.index(name) if name in _SLOW_MODULES else len(_SLOW_MODULES)

    items.sort(key=rank)  # Stable: the order inside each module is unchanged.


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One tiny finished run of every step (tests/tiny_run.py), shared by the tests of the
    commands that use a trained model: (workdir, config, each step's metrics)."""
    from tiny_run import train_tiny_run

    workdir = str(tmp_path_factory.mktemp("tiny_run"))
    config, results = train_tiny_run(workdir)
    return workdir, config, results
