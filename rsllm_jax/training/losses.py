"""The training objective of paper §4.2: NIP (Eq. 2) plus two InfoNCE alignments (Eq. 3, 4).

  L = L_NIP + γ·L_I + β·L_U            (Eq. 5; γ = 0.3, β = 0.4, τ = 0.5 in §5.1)
  L_I = InfoNCE(g_I → g_UI)            item/item: the target tower vs the target in context
  L_U = InfoNCE(g_U → g_I)             user/item: the user's history vs the target tower

InfoNCE uses cosine similarity over temperature with in-batch negatives. Eq. 3 and 4 are
one-directional (anchor first, candidates over the batch); `symmetric=True` averages both
directions. Rows of the batch with the same target item are not negatives of each other:
they are the same item, and pushing them apart would fight the positive pair. Padding rows
(example_mask False) take no part.
"""

import chex
import jax
import jax.numpy as jnp
import optax

_MASKED = -1e9  # Finite: -inf would turn masked-out entries' zero gradients into NaN.


def nip_loss_sum(logits, labels, mask):
    """(sum, count) of the token-level cross-entropy over the answer tokens only (Eq. 2)."""
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    mask = mask.astype(jnp.float32)
    return (per_token * mask).sum(), mask.sum()


def nip_loss(logits, labels, mask):
    """Token-level cross-entropy over the answer tokens only (Eq. 2), averaged over them."""
    total, count = nip_loss_sum(logits, labels, mask)
    return total / jnp.maximum(count, 1.0)


def _unit(x):
    """x / max(|x|, 1e-8), with a finite gradient at x = 0: a padding row pools nothing and
    its representation is exactly zero, where the gradient of jnp.linalg.norm is NaN."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-16))


def _cosine(a, b):
    return _unit(a) @ _unit(b).T


def info_nce(anchors, positives, item_ids, example_mask, temperature, symmetric=False):
    """−mean_i log softmax_j(cos(anchor_i, positive_j) / τ)[i] over the real rows j that are
    row i itself or hold a different item (Eq. 3/4)."""
    chex.assert_rank([anchors, positives, item_ids, example_mask], [2, 2, 1, 1])
    chex.assert_equal_shape([anchors, positives])
    chex.assert_equal_shape_prefix([anchors, item_ids, example_mask], 1)
    logits = _cosine(anchors, positives) / temperature
    real = example_mask.astype(bool)
    eye = jnp.eye(len(item_ids), dtype=bool)
    different = item_ids[:, None] != item_ids[None, :]
    # The diagonal always stays, so padding rows have a finite (ignored) loss and gradient.
    allowed = (real[None, :] & different) | eye
    weight = real.astype(jnp.float32)

    def one_direction(logits):
        masked = jnp.where(allowed, logits, _MASKED)
        log_prob = jnp.diagonal(logits) - jax.nn.logsumexp(masked, axis=1)
        return -(log_prob * weight).sum() / jnp.maximum(weight.sum(), 1.0)

    loss = one_direction(logits)
    if symmetric:
        loss = 0.5 * (loss + one_direction(logits.T))
    return loss


# The pooled representations the contrastive terms read (RSLLM.__call__ outputs).
TOWER_OUTPUTS = ("g_user", "g_user_item", "g_item")


def contrastive_loss(towers, items, example_mask, gamma, beta, temperature, symmetric=False):
    """γ·L_I + β·L_U (Eq. 3-5) over every row of `towers` (g_user, g_user_item, g_item), and
    the two terms. Every other real row of the batch is a negative (N = batch size)."""
    item_item = info_nce(towers["g_item"], towers["g_user_item"], items, example_mask, temperature,
                         symmetric)
    user_item = info_nce(towers["g_user"], towers["g_item"], items, example_mask, temperature,
                         symmetric)
    return gamma * item_item + beta * user_item, dict(item_item=item_item, user_item=user_item)


def rsllm_loss(outputs, batch, gamma, beta, temperature, symmetric=False):
    """L = L_NIP + γ·L_I + β·L_U (Eq. 5) and its parts, from `RSLLM.__call__` outputs."""
    # NIP logits (B, A, V) at the answer positions; labels and mask (B, A).
    chex.assert_rank(outputs["nip_logits"], 3)
    chex.assert_equal_shape([outputs["nip_logits"][..., 0], batch["nip_labels"], batch["nip_mask"]])
    nip = nip_loss(outputs["nip_logits"], batch["nip_labels"], batch["nip_mask"])
    parts = dict(nip=nip)
    total = nip
    if "g_item" in outputs:
        contrastive, terms = contrastive_loss(outputs, batch["target_item"], batch["example_mask"],
                                              gamma, beta, temperature, symmetric)
        parts.update(terms)
        total = total + contrastive
    parts["total"] = total
    return total, parts
