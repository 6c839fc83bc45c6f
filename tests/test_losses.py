"""The objective of paper §4.2 against NumPy formulas, duplicates and padding included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsllm_jax.training import losses


def _numpy_info_nce(a, b, items, real, tau):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    sims = a @ b.T / tau
    total, count = 0.0, 0
    for i in range(len(a)):
        if not real[i]:
            continue
        js = [j for j in range(len(a)) if j == i or (real[j] and items[j] != items[i])]
        total += -(sims[i, i] - np.log(np.exp(sims[i, js]).sum()))
        count += 1
    return total / count


@pytest.mark.parametrize("symmetric", [False, True])
def test_info_nce_matches_numpy_with_duplicates_and_padding(symmetric):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    items = np.array([3, 7, 3, 9, 1, 7])  # Rows 0/2 and 1/5 share a target item.
    real = np.array([True, True, True, True, True, False])
    got = losses.info_nce(jnp.asarray(a), jnp.asarray(b), jnp.asarray(items), jnp.asarray(real),
                          0.5, symmetric)
    expected = _numpy_info_nce(a, b, items, real, 0.5)
    if symmetric:
        expected = 0.5 * (expected + _numpy_info_nce(b, a, items, real, 0.5))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_info_nce_duplicates_are_not_negatives():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(4, 8))
    b = a.copy()
    b[2] = a[0]  # Rows 0 and 2 are the same item: row 2's positive equals row 0's.
    items = jnp.array([5, 6, 5, 8])
    with_duplicates = losses.info_nce(a, b, items, jnp.ones(4, bool), 0.5)
    distinct = losses.info_nce(a, b, jnp.array([5, 6, 4, 8]), jnp.ones(4, bool), 0.5)
    assert with_duplicates < distinct


def test_padding_rows_change_nothing_and_gradients_are_finite():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    items = jnp.arange(5)
    mask = jnp.array([True, True, True, False, False])
    full = losses.info_nce(a[:3], b[:3], items[:3], jnp.ones(3, bool), 0.5)
    padded = losses.info_nce(a, b, items, mask, 0.5)
    np.testing.assert_allclose(full, padded, rtol=1e-6)
    grads = jax.grad(lambda x: losses.info_nce(x, b, items, mask, 0.5, True))(jnp.asarray(a))
    assert np.isfinite(grads).all() and np.abs(grads[3:]).max() == 0
    # A padding row of a collated batch pools nothing: its representations are exactly zero
    # (the last, partly filled batch of every epoch). Its gradient must stay finite (zero).
    a[3:], b[3:] = 0.0, 0.0
    grads = jax.grad(lambda x, y: losses.info_nce(x, y, items, mask, 0.5, True),
                     argnums=(0, 1))(jnp.asarray(a), jnp.asarray(b))
    for g in grads:
        assert np.isfinite(g).all() and np.abs(g[3:]).max() == 0
    np.testing.assert_allclose(losses.info_nce(a, b, items, mask, 0.5), full, rtol=1e-6)


def test_nip_loss_is_masked_token_cross_entropy():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 3, 11))
    labels = rng.integers(0, 11, size=(2, 3))
    mask = np.array([[1, 1, 0], [1, 0, 0]], bool)
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_softmax, labels[..., None], -1)[..., 0]
    np.testing.assert_allclose(losses.nip_loss(logits, labels, mask), -picked[mask].mean(),
                               rtol=1e-6)


def test_total_is_eq5():
    rng = np.random.default_rng(4)
    outputs = dict(nip_logits=jnp.asarray(rng.normal(size=(3, 2, 7))),
                   g_user=jnp.asarray(rng.normal(size=(3, 4))),
                   g_user_item=jnp.asarray(rng.normal(size=(3, 4))),
                   g_item=jnp.asarray(rng.normal(size=(3, 4))))
    batch = dict(nip_labels=jnp.array([[1, 2], [3, 4], [5, 6]]), nip_mask=jnp.ones((3, 2), bool),
                 target_item=jnp.array([0, 1, 2]), example_mask=jnp.ones(3, bool))
    total, parts = losses.rsllm_loss(outputs, batch, gamma=0.3, beta=0.4, temperature=0.5)
    np.testing.assert_allclose(total,
                               parts["nip"] + 0.3 * parts["item_item"] + 0.4 * parts["user_item"],
                               rtol=1e-6)
    np.testing.assert_allclose(
        parts["item_item"],
        losses.info_nce(outputs["g_item"], outputs["g_user_item"], batch["target_item"],
                        batch["example_mask"], 0.5), rtol=1e-6)
    nip_only, parts = losses.rsllm_loss({k: v
                                         for k, v in outputs.items() if k != "g_item"}, batch, 0.3,
                                        0.4, 0.5)
    assert set(parts) == {"nip", "total"} and nip_only == parts["nip"]
