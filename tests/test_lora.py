"""LoRA: zero-initialised B, peft's scale, merge equivalence, gradients only where expected."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from rsllm_jax.models import llama, lora as lora_lib
from rsllm_jax.parallel import mesh as mesh_lib


def _setup(scan):
    config = llama.get_config(
        "tiny",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_heads=4,
        num_kv_heads=2,
        scan_layers=scan,
        lora=lora_lib.LoraConfig(rank=2, alpha=6.0, dropout=0.5),
        initializer_range=0.2,
    )
    model = llama.Llama(config)
    return (
        config,
        model,
        mesh_lib.init_sharded(model, jax.random.key(0), jnp.ones((1, 1), jnp.int32)),
    )


@functools.partial(jax.jit, static_argnums=0)
def _jit_logits(model, variables, tokens, rngs):
    return model.apply(variables, tokens, rngs=rngs).logits


def _logits(model, variables, tokens, rng=None):
    """Jitted forward, compiled once per model (eager Flax apply is slow on CPU)."""
    return _jit_logits(model, variables, tokens, None if rng is None else {"dropout": rng})


def test_init_scale_merge_and_grads():
    config, model, variables = _setup(scan=True)
    assert config.lora.scale == 3.0
    params, lora = variables["params"], variables["lora"]
    q = lora["layers"]["self_attn"]["q_proj"]
    assert q["a"].shape == (2, 32, 2) and q["b"].shape == (2, 2, 4, 8)
    assert all(not np.any(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(lora)
               if path[-1].key == "b")
    tokens = np.arange(10, dtype=np.int32).reshape(2, 5)
    base = _logits(model, {"params": params, "lora": lora}, tokens)

    # Gradients w.r.t. the lora collection only; with B = 0 only B gets a gradient.
    def loss(lora, params):
        return jnp.mean(_logits(model, {"params": params, "lora": lora}, tokens)**2)

    grads = jax.jit(jax.grad(loss))(lora, params)
    assert not np.any(grads["layers"]["mlp"]["up_proj"]["a"])
    assert np.any(grads["layers"]["mlp"]["up_proj"]["b"])

    lora = jax.tree_util.tree_map(lambda x: x + 0.1 * jnp.ones_like(x), lora)
    adapted = _logits(model, {"params": params, "lora": lora}, tokens)
    assert np.abs(adapted - base).max() > 1e-3
    merged = lora_lib.merge_lora(params, lora, config.lora)
    plain = llama.Llama(config.replace(lora=None))
    np.testing.assert_allclose(_logits(plain, {"params": merged}, tokens), adapted, atol=1e-4)
    # Explicit formula for one kernel: W + (alpha / r) * a @ b.
    a, b = lora["layers"]["mlp"]["down_proj"]["a"][1], lora["layers"]["mlp"]["down_proj"]["b"][1]
    np.testing.assert_allclose(
        merged["layers"]["mlp"]["down_proj"]["kernel"][1],
        params["layers"]["mlp"]["down_proj"]["kernel"][1] + 3.0 * a @ b,
        atol=1e-6,
    )

    # Dropout acts on the adapter path only, and only when not deterministic.
    train = llama.Llama(config, deterministic=False)
    d1 = _logits(train, {"params": params, "lora": lora}, tokens, jax.random.key(1))
    d2 = _logits(train, {"params": params, "lora": lora}, tokens, jax.random.key(2))
    assert np.abs(d1 - d2).max() > 1e-4
    zero = jax.tree_util.tree_map(jnp.zeros_like, lora)
    d0 = _logits(train, {"params": params, "lora": zero}, tokens, jax.random.key(1))
    np.testing.assert_allclose(d0, _logits(model, {"params": params, "lora": zero}, tokens),
                               atol=1e-6)


def test_targets_select_projections():
    config = llama.get_config("tiny", lora=lora_lib.LoraConfig(rank=2, targets=("k", "up")))
    variables = mesh_lib.abstract_variables(llama.Llama(config), jnp.ones((1, 1), jnp.int32))
    layer = variables["lora"]["layers_0"]
    assert set(layer["self_attn"]) == {"k_proj"} and set(layer["mlp"]) == {"up_proj"}
    try:
        lora_lib.LoraConfig(targets=("qkv", ))
    except ValueError as e:
        assert "qkv" in str(e)
    else:
        raise AssertionError("unknown target accepted")
