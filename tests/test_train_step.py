"""The train step over accumulated micro-batches equals one step over their rows as one batch:
the next-item loss by accumulation, the InfoNCE terms over the whole batch by gradient caching."""

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
import pytest

from configs import base
from rsllm_jax.models import llama, lora as lora_lib, rsllm
from rsllm_jax.prompts import batching
from rsllm_jax.training import optim, train_step
from stage_batches import stage_batch

VOCAB, NUM_NEW, SLOTS = 256, 3, 6


def _model():
    config = llama.get_config("tiny", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                              num_layers=1, num_heads=8, num_kv_heads=4, tie_word_embeddings=False,
                              initializer_range=0.2, lora=lora_lib.LoraConfig(rank=4, alpha=8.0))
    return rsllm.RSLLM(config, num_new_tokens=NUM_NEW)


def whole_batch(rows, seed=0):
    """A batch with what accumulation must get right: target items repeated across
    micro-batches (not negatives of each other), answers of different lengths (NIP averages
    over tokens, not micro-batches) and a padding row."""
    rng = np.random.default_rng(seed)
    batch = stage_batch(rng, rows, 24, VOCAB, VOCAB, NUM_NEW, SLOTS, num_items=6)
    batch["nip_mask"][:, 1:] = rng.random((rows, 3)) < 0.6
    batch["example_mask"][rows - 1] = False
    return batch


def split(batch, k):
    """The same rows as k stacked micro-batches (k, rows / k, ...)."""
    return {key: value.reshape((k, -1) + value.shape[1:]) for key, value in batch.items()}


def initial_variables(model, batch, table, seed=2):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: (1.0 if "scale" in jax.tree_util.keystr(path) else 0.0) + 0.2 * rng.
        standard_normal(x.shape).astype(np.float32),
        nn.unbox(jax.eval_shape(model.init, jax.random.key(0), batch, table)))


def train_config(gamma=0.3, beta=0.4):
    return ml_collections.ConfigDict(
        dict(gamma=gamma, beta=beta, temperature=0.5, symmetric_infonce=False))


def gradients_of_one_update(model, config, frozen, trainable, micro_batches, table):
    """(metrics, gradient): plain SGD with rate 1 moves each parameter by minus its gradient."""
    optimizer = optax.sgd(1.0)
    step = jax.jit(
        train_step.make_train_step(model, optimizer, config, config.gamma > 0 or config.beta > 0))
    state, metrics = step(train_step.create_state(trainable, optimizer, 0), frozen, micro_batches,
                          table)
    grads = jax.tree.map(lambda new, old: np.asarray(old) - np.asarray(new), state.trainable,
                         trainable)
    return {k: float(v) for k, v in metrics.items()}, grads


@pytest.mark.parametrize("k, gamma, beta", [(2, 0.3, 0.4), (4, 0.3, 0.4), (4, 0.0, 0.0)])
def test_accumulated_update_equals_one_batch_of_all_rows(k, gamma, beta):
    model, batch = _model(), whole_batch(16)
    table = np.random.default_rng(1).normal(size=(7, 16)).astype(np.float32)
    frozen, trainable = rsllm.split_variables(initial_variables(model, batch, table))
    config = train_config(gamma, beta)
    one_metrics, one_grads = gradients_of_one_update(model, config, frozen, trainable,
                                                     split(batch, 1), table)
    metrics, grads = gradients_of_one_update(model, config, frozen, trainable, split(batch, k),
                                             table)
    assert set(metrics) == set(one_metrics)
    for key, value in one_metrics.items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-4, err_msg=key)
    if gamma:  # The contrastive terms really take part, and really see the whole batch.
        assert one_metrics["user_item"] > 0.5 and one_metrics["item_item"] > 0.5
    for (path, got), want in zip(
            jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(one_grads)):
        scale = np.abs(want).max()
        assert scale > 0, jax.tree_util.keystr(path)  # Every trainable gets a gradient.
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * scale,
                                   err_msg=jax.tree_util.keystr(path))


def test_per_micro_batch_negatives_would_differ():
    """What the old accumulation did (InfoNCE within each micro-batch, gradients averaged) is
    measurably another objective: the test above can tell them apart."""
    model, batch = _model(), whole_batch(16)
    table = np.random.default_rng(1).normal(size=(7, 16)).astype(np.float32)
    frozen, trainable = rsllm.split_variables(initial_variables(model, batch, table))
    config = train_config()
    whole, _ = gradients_of_one_update(model, config, frozen, trainable, split(batch, 1), table)
    parts = [
        gradients_of_one_update(model, config, frozen, trainable,
                                split({key: v[i * 4:(i + 1) * 4]
                                       for key, v in batch.items()}, 1), table)[0] for i in range(4)
    ]
    assert abs(np.mean([p["user_item"] for p in parts]) - whole["user_item"]) > 0.1


def test_step_logs_the_norms_of_the_updated_parameters():
    """The step's parameter norms are those of the parameters it returns (after the update),
    one for the LoRA factors and one per adapter part, as NumPy computes them."""
    model, batch = _model(), whole_batch(8)
    table = np.random.default_rng(1).normal(size=(7, 16)).astype(np.float32)
    frozen, trainable = rsllm.split_variables(initial_variables(model, batch, table))
    optimizer = optax.sgd(0.5)
    step = jax.jit(train_step.make_train_step(model, optimizer, train_config(), True))
    state, metrics = step(train_step.create_state(trainable, optimizer, 0), frozen, split(batch, 2),
                          table)
    numpy_norm = lambda tree: np.sqrt(
        sum(  # noqa: E731
            np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree)))
    adapter = state.trainable["adapter"]
    want = dict(lora_norm=numpy_norm(state.trainable["lora"]),
                projector_norm=numpy_norm(adapter["projector"]),
                new_token_embedding_norm=numpy_norm(adapter["new_token_embedding"]))
    for key, value in want.items():
        np.testing.assert_allclose(float(metrics[key]), value, rtol=1e-5, err_msg=key)
    # The update moved the parameters, so norms of the old ones would fail the check above.
    assert abs(numpy_norm(trainable["adapter"]["projector"]) - want["projector_norm"]) > 1e-3


def test_stacked_micro_batches_pad_to_the_largest_bucket():
    short = {"tokens": np.ones((2, 4), np.int32), "example_mask": np.ones(2, bool)}
    long = {"tokens": np.full((2, 6), 7, np.int32), "example_mask": np.array([True, False])}
    stacked = batching.stack([short, long])
    assert stacked["tokens"].shape == (2, 2, 6)
    np.testing.assert_array_equal(stacked["tokens"][0], [[1] * 4 + [0] * 2] * 2)
    np.testing.assert_array_equal(stacked["example_mask"], [[True, True], [True, False]])


def _after_updates(params, grads, learning_rate, projector_lr_scale):
    config = base.get_config().train
    config.learning_rate, config.projector_lr_scale = learning_rate, projector_lr_scale
    optimizer = optim.make_optimizer(config, total_steps=len(grads))
    opt_state = optimizer.init(params)
    for grad in grads:
        updates, opt_state = optimizer.update(grad, opt_state, params)
        params = optax.apply_updates(params, updates)
    return params


def test_projector_lr_scale_trains_only_the_projector_at_that_multiple():
    """Over several updates (warm-up, clipping, decay), the projector moves exactly as under
    learning_rate × scale and every other parameter as under learning_rate."""
    rng = np.random.default_rng(0)
    normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
    params = {
        "lora": {"a": normal(3, 2)}, "adapter": {
            "projector": {"w1": normal(4, 3), "b1": normal(3)}, "new_token_embedding": normal(2, 3)
        }
    }
    grads = [jax.tree.map(lambda x: normal(*x.shape), params) for _ in range(5)]
    scaled = _after_updates(params, grads, 1e-2, 4.0)
    plain, fast = _after_updates(params, grads, 1e-2, 1.0), _after_updates(params, grads, 4e-2, 1.0)
    projector = optim.projector_leaves(params)
    assert sorted(
        jax.tree_util.keystr(p) for p, leaf in jax.tree_util.tree_leaves_with_path(projector)
        if leaf) == ["['adapter']['projector']['b1']", "['adapter']['projector']['w1']"]
    for is_projector, got, under_fast, under_plain in zip(
            *map(jax.tree.leaves, (projector, scaled, fast, plain))):
        np.testing.assert_allclose(got, under_fast if is_projector else under_plain, rtol=1e-5,
                                   atol=1e-7)
        if is_projector:  # The scale changed something.
            assert np.abs(got - under_plain).max() > 1e-3


def test_projector_lr_scale_must_be_positive():
    config = base.get_config().train
    config.projector_lr_scale = 0.0
    with pytest.raises(ValueError, match="projector_lr_scale"):
        optim.make_optimizer(config, total_steps=10)
