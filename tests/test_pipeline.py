"""The input pipeline: fixed shapes, full coverage, determinism, host shards, exact resume."""

import numpy as np
import pytest

from rsllm_jax.data.pipeline import BatchIterator
from rsllm_jax.data.prepare import prepare
from rsllm_jax.data.storage import PreparedDataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    prepare("synthetic", "", str(out), synthetic=dict(num_users=60, num_items=120))
    return PreparedDataset(str(out))


def _iterator(dataset, split="train", batch=32, **kwargs):
    kwargs.setdefault("process_index", 0)
    kwargs.setdefault("process_count", 1)
    return BatchIterator(dataset, split, batch, **kwargs)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_fixed_shapes_and_each_epoch_covers_every_row_once(dataset):
    it = _iterator(dataset, num_epochs=2)
    batches = list(it)
    assert len(batches) == 2 * it.steps_per_epoch
    for batch in batches:
        assert batch["history"].shape == (32, 10) and batch["candidates"].shape == (32, 20)
        assert batch["mask"].dtype == bool
    n = dataset.num_rows("train")
    for epoch in range(2):
        epoch_batches = batches[epoch * it.steps_per_epoch:(epoch + 1) * it.steps_per_epoch]
        ids = np.concatenate([b["row_id"][b["mask"]] for b in epoch_batches])
        assert sorted(ids.tolist()) == sorted(dataset.read("train")["row_id"].tolist())
        assert len(ids) == n
    assert batches[it.steps_per_epoch - 1]["mask"].sum() == n - 32 * (it.steps_per_epoch - 1)
    first = [b["row_id"] for b in batches[:it.steps_per_epoch]]
    second = [b["row_id"] for b in batches[it.steps_per_epoch:]]
    assert any((a != b).any() for a, b in zip(first, second))  # Reshuffled per epoch.


def test_same_seed_same_batches_other_seed_other_batches(dataset):
    _assert_same(_take(_iterator(dataset, seed=3), 5), _take(_iterator(dataset, seed=3), 5))
    a, b = _take(_iterator(dataset, seed=3), 1)[0], _take(_iterator(dataset, seed=4), 1)[0]
    assert (a["row_id"] != b["row_id"]).any()


def test_train_candidates_redrawn_per_epoch_fixed_per_epoch_and_row(dataset):
    it = _iterator(dataset, batch=dataset.num_rows("train"), shuffle=False, num_epochs=2)
    epoch0, epoch1 = list(it)
    assert (epoch0["candidates"] != epoch1["candidates"]).any(axis=1).mean() > 0.9
    again = _iterator(dataset, batch=dataset.num_rows("train"), shuffle=False)
    np.testing.assert_array_equal(next(again)["candidates"], epoch0["candidates"])
    shuffled = next(_iterator(dataset, batch=dataset.num_rows("train")))
    order = np.argsort(shuffled["row_id"])
    np.testing.assert_array_equal(shuffled["candidates"][order], epoch0["candidates"])
    for c, t in zip(epoch0["candidates"], epoch0["target"]):
        assert (c == t).sum() == 1


def test_eval_split_is_one_ordered_pass_with_stored_candidates(dataset):
    batches = list(_iterator(dataset, "test", batch=4))
    stored = dataset.read("test")
    ids = np.concatenate([b["row_id"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(ids, stored["row_id"])
    candidates = np.concatenate([b["candidates"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(candidates, stored["candidates"])


def test_hosts_read_disjoint_slices_of_the_same_global_batches(dataset):
    whole = _take(_iterator(dataset, batch=32, seed=1), 4)
    hosts = [
        _take(_iterator(dataset, batch=32, seed=1, process_index=p, process_count=4), 4)
        for p in range(4)
    ]
    for step in range(4):
        for key in whole[step]:
            joined = np.concatenate([hosts[p][step][key] for p in range(4)])
            np.testing.assert_array_equal(joined, whole[step][key], err_msg=key)
    assert hosts[0][0]["history"].shape == (8, 10)
    with pytest.raises(ValueError, match="not divisible"):
        _iterator(dataset, batch=30, process_index=0, process_count=4)


def test_resume_from_saved_state_replays_exactly(dataset):
    reference = _iterator(dataset, seed=5)
    steps = reference.steps_per_epoch
    expected = _take(reference, 2 * steps + 3)
    for stop in (1, steps - 1, steps, steps + 2):
        it = _iterator(dataset, seed=5)
        _take(it, stop)
        state = it.get_state()
        resumed = _iterator(dataset, seed=5)
        resumed.set_state(state)
        _assert_same(_take(resumed, 2 * steps + 3 - stop), expected[stop:])


def test_mismatched_state_is_refused(dataset):
    state = _iterator(dataset, seed=5).get_state()
    with pytest.raises(ValueError, match="saved with seed=5"):
        _iterator(dataset, seed=6).set_state(state)
    with pytest.raises(ValueError, match="global_batch_size"):
        _iterator(dataset, batch=16, seed=5).set_state(state)


def test_in_memory_and_on_demand_reads_agree(dataset):
    _assert_same(_take(_iterator(dataset, in_memory=True), 3),
                 _take(_iterator(dataset, in_memory=False), 3))


def test_drop_remainder(dataset):
    it = _iterator(dataset, drop_remainder=True, num_epochs=1)
    batches = list(it)
    assert len(batches) == dataset.num_rows("train") // 32
    assert all(b["mask"].all() for b in batches)


def test_without_candidates_train_batches_keep_the_stored_placeholders(dataset):
    batch = next(_iterator(dataset, with_candidates=False))
    assert (batch["candidates"] == -1).all()
    np.testing.assert_array_equal(batch["row_id"], next(_iterator(dataset))["row_id"])


def test_shared_titles_get_candidates_of_distinct_titles_in_every_split(tmp_path):
    from rsllm_jax.data.candidates import title_groups

    out = str(tmp_path / "shared")
    prepare("synthetic", "", out, distinct_candidate_titles=True,
            synthetic=dict(num_users=60, num_items=90, num_genres=3, items_per_title=3))
    shared = PreparedDataset(out)
    group = title_groups(shared.catalogue)
    assert group.max() == 29  # 30 titles of 3 items.
    train = next(_iterator(shared, batch=shared.num_rows("train"), shuffle=False))
    for batch in (train, shared.read("val"), shared.read("test")):
        for c, t in zip(batch["candidates"], batch["target"]):
            assert len(set(group[c].tolist())) == 20 and (c == t).sum() == 1
