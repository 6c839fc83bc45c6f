"""The candidate sampler: exactly one target, no history items, no duplicates, seeded."""

import numpy as np
import pytest

from rsllm_jax.data.candidates import NUM_CANDIDATES, candidates_for_rows, stream_key


def _rows(n, num_items, seed=0):
    rng = np.random.default_rng(seed)
    history = np.full((n, 10), num_items, np.int64)
    lengths = rng.integers(0, 11, n)
    target = np.empty(n, np.int64)
    for i, length in enumerate(lengths):
        items = rng.choice(num_items, length + 1, replace=False)
        history[i, :length], target[i] = items[:length], items[length]
    return history, lengths, target, np.arange(n) * 7 + 3


def test_invariants_on_many_rows():
    num_items = 60
    history, lengths, target, row_id = _rows(500, num_items)
    excluded = np.zeros(num_items, bool)
    excluded[[5, 17]] = True
    out = candidates_for_rows(history, lengths, target, row_id, num_items, (0, 1),
                              excluded=excluded)
    assert out.shape == (500, NUM_CANDIDATES) and out.dtype == np.int32
    for c, h, n, t in zip(out, history, lengths, target):
        assert len(set(c.tolist())) == NUM_CANDIDATES
        assert (c == t).sum() == 1
        assert not set(c.tolist()) & set(h[:n].tolist())
        assert not set(c.tolist()) & {5, 17} or t in (5, 17)
        assert ((0 <= c) & (c < num_items)).all()


def test_fixed_by_seed_and_independent_of_the_batch():
    history, lengths, target, row_id = _rows(64, 500)
    a = candidates_for_rows(history, lengths, target, row_id, 500, (7, 2))
    b = candidates_for_rows(history, lengths, target, row_id, 500, (7, 2))
    np.testing.assert_array_equal(a, b)
    # A row's set depends on its own id and the seed, not on its neighbours.
    part = candidates_for_rows(history[10:13], lengths[10:13], target[10:13], row_id[10:13], 500,
                               (7, 2))
    np.testing.assert_array_equal(part, a[10:13])
    other = candidates_for_rows(history, lengths, target, row_id, 500, (8, 2))
    assert (other != a).any(axis=1).mean() > 0.95


def test_target_slot_and_negatives_are_uniform():
    num_items, n = 100, 20000
    history = np.full((n, 10), num_items)
    out = candidates_for_rows(history, np.zeros(n, int), np.zeros(n, int), np.arange(n), num_items,
                              (0, ))
    slots = np.bincount(np.argmax(out == 0, axis=1), minlength=NUM_CANDIDATES)
    assert slots.min() > 0.8 * n / NUM_CANDIDATES and slots.max() < 1.2 * n / NUM_CANDIDATES
    counts = np.bincount(out.ravel(), minlength=num_items)[1:]  # Item 0 is always the target.
    expected = n * (NUM_CANDIDATES - 1) / (num_items - 1)
    assert np.abs(counts / expected - 1).max() < 0.1


def test_tiny_catalogue_is_exact_or_refused():
    history = np.array([[0, 1, 2, 50, 50, 50, 50, 50, 50, 50]])
    out = candidates_for_rows(history, [3], [3], [0], 23, (0, ))
    assert sorted(out[0].tolist()) == list(range(3, 23))
    with pytest.raises(ValueError, match="leaves only 18 items"):
        candidates_for_rows(history, [3], [3], [0], 22, (0, ))


def test_stream_keys_differ():
    assert len({int(stream_key(0, s)) for s in range(3)} | {int(stream_key(1, 0))}) == 4


def test_distinct_titles_when_items_share_them():
    num_items = 90
    history, lengths, target, row_id = _rows(400, num_items)
    group = np.arange(num_items) // 3  # Items 0-2 share a title, 3-5 the next, ...
    out = candidates_for_rows(history, lengths, target, row_id, num_items, (0, 1),
                              title_group=group)
    for c, h, n, t in zip(out, history, lengths, target):
        assert len(set(group[c].tolist())) == NUM_CANDIDATES  # One candidate per title.
        assert (c == t).sum() == 1 and not set(c.tolist()) & set(h[:n].tolist())
    # With empty histories, the 29 titles other than the target's come about equally often.
    n = 6000
    many = candidates_for_rows(np.full((n, 10), num_items), np.zeros(n, int), np.zeros(n, int),
                               np.arange(n), num_items, (0, ), title_group=group)
    counts = np.bincount(group[many].ravel(), minlength=30)[1:]
    expected = n * (NUM_CANDIDATES - 1) / 29
    assert np.abs(counts / expected - 1).max() < 0.1
    # One title per item is the plain rule, draw for draw.
    np.testing.assert_array_equal(
        candidates_for_rows(history, lengths, target, row_id, num_items, (0, 1),
                            title_group=np.arange(num_items)),
        candidates_for_rows(history, lengths, target, row_id, num_items, (0, 1)))


def test_too_few_distinct_titles_is_refused():
    # 60 items in 20 titles: a history that holds every item of one title leaves 18 others.
    group = np.arange(60) // 3
    history = np.array([[0, 1, 2, 60, 60, 60, 60, 60, 60, 60]])
    with pytest.raises(ValueError, match="leaves only 18 items of distinct titles"):
        candidates_for_rows(history, [3], [3], [0], 60, (0, ), title_group=group)
    out = candidates_for_rows(history, [2], [3], [0], 60, (0, ), title_group=group)
    assert sorted(group[out[0]].tolist()) == list(range(20))
