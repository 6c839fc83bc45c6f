"""The recommender modules, their losses, the ranking metrics and the embedding table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsllm_jax.evaluation import ranking
from rsllm_jax.recommenders import embeddings, models, train

NUM_ITEMS = 40


def _init(name, batch=4):
    model = models.build_model(name, NUM_ITEMS)
    rng = np.random.default_rng(0)
    history = rng.integers(0, NUM_ITEMS, (batch, 10)).astype(np.int32)
    history_len = np.array([3, 10, 1, 6][:batch], np.int32)
    for row, n in enumerate(history_len):
        history[row, n:] = NUM_ITEMS  # Right padding with the pad id.
    params = model.init(jax.random.key(0), history, history_len)
    return model, params, history, history_len


@pytest.mark.parametrize("name", models.MODELS)
def test_shapes_and_item_scores(name):
    model, params, history, history_len = _init(name)
    scores = model.apply(params, history, history_len)
    assert scores.shape == (4, NUM_ITEMS)
    assert models.item_embedding_table(params["params"]).shape == (NUM_ITEMS + 1, 64)
    items = np.array([[0, 5], [7, 39], [1, 1], [20, 3]], np.int32)
    chosen = model.apply(params, history, history_len, items, method=model.score_items)
    np.testing.assert_allclose(chosen, np.take_along_axis(np.asarray(scores), items, 1), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("name", models.MODELS)
def test_padding_never_changes_scores(name):
    model, params, history, history_len = _init(name)
    scores = model.apply(params, history, history_len)
    other = history.copy()
    rng = np.random.default_rng(1)
    for row, n in enumerate(history_len):
        other[row, n:] = rng.integers(0, NUM_ITEMS, 10 - n)  # Real ids in padded slots.
    np.testing.assert_array_equal(model.apply(params, other, history_len), scores)
    # ...while a real position does matter.
    changed = history.copy()
    changed[:, 0] = (changed[:, 0] + 1) % NUM_ITEMS
    assert not np.allclose(model.apply(params, changed, history_len), scores)


def test_sasrec_is_causal():
    model, params, history, _ = _init("sasrec")
    full = np.full(4, 10, np.int32)
    states = model.apply(params, history, full, method=model.sequence_states)
    for position in (3, 7):
        changed = history.copy()
        changed[:, position] = (changed[:, position] + 1) % NUM_ITEMS
        after = model.apply(params, changed, full, method=model.sequence_states)
        np.testing.assert_array_equal(after[:, :position], states[:, :position])
        assert not np.allclose(after[:, position], states[:, position])


def test_dropout_only_in_training():
    model, params, history, history_len = _init("sasrec")
    eval_a = model.apply(params, history, history_len)
    np.testing.assert_array_equal(eval_a, model.apply(params, history, history_len))
    train_a = model.apply(params, history, history_len, deterministic=False,
                          rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(train_a, eval_a)


def test_bce_loss_matches_numpy():
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(size=6).astype(np.float32), rng.normal(size=6).astype(np.float32)
    mask = np.array([1, 1, 1, 1, 0, 1], bool)
    sigmoid = lambda x: 1 / (1 + np.exp(-x))
    per_score = np.concatenate([-np.log(sigmoid(pos[mask])), -np.log(1 - sigmoid(neg[mask]))])
    got = train.bce_loss(jnp.asarray(pos), jnp.asarray(neg), jnp.asarray(mask, jnp.float32))
    np.testing.assert_allclose(got, per_score.mean(), rtol=1e-5)


def test_ce_loss_matches_numpy():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(5, 12)).astype(np.float32)
    target = np.array([0, 3, 11, 5, 5])
    mask = np.array([1, 0, 1, 1, 1], np.float32)
    log_softmax = scores - np.log(np.exp(scores).sum(1, keepdims=True))
    expected = -log_softmax[np.arange(5), target][mask > 0].mean()
    got = train.ce_loss(jnp.asarray(scores), jnp.asarray(target), jnp.asarray(mask))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_dros_term_and_propensity_match_numpy():
    # Item weights by hand: counts of items 0..3 as targets are 2, 0, 1, 0 (+1 each: 3,1,2,1).
    weights = train.propensity_scores(np.array([0, 2, 0]), 4, gamma=0.5)
    np.testing.assert_allclose(weights, np.sqrt(np.array([3, 1, 2, 1]) / 7), rtol=1e-6)
    # The term as DROS's training loop writes it, on scores large enough that exp(x²) would
    # overflow float32 if computed naively.
    rng = np.random.default_rng(0)
    scores = rng.normal(scale=3.0, size=(5, 12)).astype(np.float32)
    scores[2, 4] = 12.0
    target, mask = np.array([0, 3, 11, 5, 5]), np.array([1, 0, 1, 1, 1], np.float32)
    ps = rng.uniform(0.5, 1.0, 12).astype(np.float32)
    beta, rows = 0.7, np.arange(5)
    s = scores.astype(np.float64)
    inner = (np.exp(ps * s**2 / beta).sum(1) - np.exp(ps[target] * s[rows, target]**2 / beta) +
             np.exp(ps[target] * (s[rows, target] - 1)**2 / beta))
    expected = np.log(inner)[mask > 0].mean()
    got = train.dros_loss(jnp.asarray(scores), jnp.asarray(target), jnp.asarray(mask),
                          jnp.asarray(ps), beta)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_negatives_are_uniform_non_targets_and_seeded():
    target = np.arange(2000) % 7
    row_id = np.arange(2000)
    neg = train.sample_negatives(target, row_id, 7, seed=3, epoch=0)
    assert ((neg >= 0) & (neg < 7)).all() and (neg != target).all()
    assert len(np.unique(neg)) == 7
    np.testing.assert_array_equal(neg, train.sample_negatives(target, row_id, 7, 3, 0))
    assert (neg != train.sample_negatives(target, row_id, 7, 3, 1)).any()


def test_ranks_break_ties_like_argmax():
    scores = np.array([[0.1, 0.9, 0.5, 0.9], [0.3, 0.3, 0.3, 0.3], [0.3, 0.3, 0.3, 0.3]])
    np.testing.assert_array_equal(ranking.ranks(scores, np.array([3, 0, 2])), [1, 0, 2])
    np.testing.assert_array_equal(
        ranking.ranks(scores, np.array([1, 0, 2])) == 0,
        scores.argmax(1) == np.array([1, 0, 2]))


def test_nan_scores_never_rank_above_numbers():
    scores = np.array([[np.nan, np.nan, np.nan], [0.1, np.nan, 0.3], [np.nan, 0.2, 0.1]])
    # Row 0: all NaN, the target (column 1) ranks last, beyond the 3 columns: no hit.
    # Row 1: target 0.1 is below 0.3 only. Row 2: target 0.1 is below 0.2 only.
    np.testing.assert_array_equal(ranking.ranks(scores, np.array([1, 0, 2])), [3, 1, 1])
    assert ranking.hit_ratio(ranking.ranks(scores, np.array([1, 0, 2])), 1).sum() == 0


def test_hit_ratio_and_ndcg_by_hand():
    # Items 0..5; candidates are subsets. Row 0: target 2 ranked 0th among candidates [2, 4, 1]
    # and 1st in the catalogue; row 1: target 5 ranked 2nd among [0, 5, 3].
    all_scores = np.array([[0.0, 0.5, 0.8, 0.1, 0.2, 0.9], [0.7, 0.0, 0.1, 0.9, 0.3, 0.4]])
    candidates = np.array([[2, 4, 1], [0, 5, 3]])
    metrics = ranking.recommendation_metrics(all_scores, candidates, np.array([2, 5]))
    assert metrics["hit_ratio_at_1"] == 0.5
    assert metrics["hit_ratio_at_5"] == 1.0
    np.testing.assert_allclose(metrics["ndcg_at_5"], (1.0 + 1 / np.log2(4)) / 2)
    # Catalogue ranks: row 0 → 1 (0.9 above), row 1 → 2 (0.9, 0.7 above).
    assert metrics["full_hit_ratio_at_10"] == 1.0
    np.testing.assert_allclose(metrics["full_ndcg_at_10"], (1 / np.log2(3) + 1 / np.log2(4)) / 2)
    with pytest.raises(ValueError, match="target"):
        ranking.recommendation_metrics(all_scores, candidates, np.array([3, 5]))


def test_embedding_table_round_trip(tmp_path):
    table = np.arange(6 * 4, dtype=np.float32).reshape(6, 4)
    path = embeddings.save_item_embeddings(tmp_path / "emb.npy", table, num_items=5, model="sasrec",
                                           source="test")
    loaded, meta = embeddings.load_item_embeddings(path, num_items=5)
    np.testing.assert_array_equal(loaded[:5], table[:5])
    assert (loaded[5] == 0).all() and meta["padding_row"] == 5 == meta["pad_id"]
    with pytest.raises(ValueError, match="catalogue has 7"):
        embeddings.load_item_embeddings(path, num_items=7)
    with pytest.raises(ValueError, match="expected"):
        embeddings.save_item_embeddings(tmp_path / "bad.npy", table, num_items=9, model="x",
                                        source="test")


def test_embedding_table_with_nan_is_refused(tmp_path):
    table = np.ones((6, 4), np.float32)
    table[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"from test: 1 row\(s\) hold NaN .* item 2"):
        embeddings.save_item_embeddings(tmp_path / "e.npy", table, num_items=5, model="x",
                                        source="test")
    path = embeddings.save_item_embeddings(tmp_path / "e.npy", np.ones((6, 4)), num_items=5,
                                           model="x", source="test")
    np.save(path, table)  # Corrupted on disk after it was written.
    with pytest.raises(ValueError, match=r"e.npy: 1 row\(s\) hold NaN"):
        embeddings.load_item_embeddings(path, num_items=5)
