"""RSLLM around the Llama: injection at placeholders, new rows, towers, trainable split."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rsllm_jax.models import llama, lora, rsllm


def _model():
    config = llama.get_config("tiny", vocab_size=64, hidden_size=32, intermediate_size=48,
                              num_heads=4, num_kv_heads=2, lora=lora.LoraConfig(rank=2, alpha=4))
    return rsllm.RSLLM(config, num_new_tokens=3)


def _batch():
    tokens = np.array([[1, 5, 64, 65, 7, 66, 9, 2, 0, 0], [1, 66, 8, 66, 9, 11, 12, 13, 14, 2]],
                      np.int32)
    placeholder_mask = tokens == 66  # The third new token is the placeholder here.
    return dict(tokens=tokens, attention_mask=np.array([[1] * 8 + [0] * 2, [1] * 10], bool),
                nip_positions=np.array([[5, 6], [7, 8]], np.int32), history_mask=np.zeros(
                    (2, 10), bool), answer_mask=np.zeros((2, 10),
                                                         bool), placeholder_mask=placeholder_mask,
                placeholder_items=np.array([[4, 0, 0], [2, 6, 0]], np.int32),
                target_tokens=np.array([[1, 66, 0], [1, 66, 3]], np.int32),
                target_attention_mask=np.array([[1, 1, 0], [1, 1, 1]], bool),
                target_pool_mask=np.array([[0, 1, 0], [0, 1, 1]], bool),
                target_placeholder_mask=np.array([[0, 1, 0], [0, 1, 0]], bool),
                target_placeholder_items=np.array([[4], [6]], np.int32))


def test_injection_puts_projected_rows_exactly_at_placeholders():
    model, batch = _model(), _batch()
    table = jax.random.normal(jax.random.key(1), (8, 64))
    variables = model.init(jax.random.key(0), batch, table)
    x = model.apply(variables, batch["tokens"], batch["placeholder_mask"],
                    batch["placeholder_items"], table, method=rsllm.RSLLM.embed_inputs)
    adapter = nn.unbox(variables["adapter"])
    proj = model.bind(variables).projector
    base = nn.unbox(variables["params"])["llm"]["embed_tokens"]["embedding"]
    tokens = batch["tokens"]
    for b in range(2):
        k = 0
        for s in range(10):
            t = tokens[b, s]
            if batch["placeholder_mask"][b, s]:
                expected = proj(table[batch["placeholder_items"][b, k]])
                k += 1
            elif t >= 64:
                expected = adapter["new_token_embedding"][t - 64]
            else:
                expected = base[t]
            np.testing.assert_allclose(x[b, s], expected, rtol=1e-5, atol=1e-6)


def test_towers_and_only_trainable_collections_get_gradients():
    model, batch = _model(), _batch()
    table = jax.random.normal(jax.random.key(1), (8, 64))
    variables = model.init(jax.random.key(0), batch, table)
    frozen, trainable = rsllm.split_variables(variables)
    assert set(trainable) == {"lora", "adapter"} and set(frozen) == {"params"}
    out = model.apply(variables, batch, table)
    assert out["nip_logits"].shape == (2, 2, 64)
    assert out["g_item"].shape == (2, 32)

    def loss(trainable):
        out = model.apply({**frozen, **trainable}, batch, table)
        return (out["nip_logits"]**2).mean() + (out["g_item"]**2).mean()

    grads = jax.grad(loss)(trainable)
    norms = jax.tree.map(lambda g: float(jnp.abs(g).sum()), nn.unbox(grads))
    assert norms["adapter"]["projector"]["w1"] > 0  # The placeholders reach the loss.
    assert norms["adapter"]["new_token_embedding"] > 0
    assert norms["lora"]["llm"]["layers_0"]["self_attn"]["q_proj"]["a"] == 0  # b = 0 at init.
    assert norms["lora"]["llm"]["layers_0"]["self_attn"]["q_proj"]["b"] > 0


def test_target_tower_ignores_padding_and_matches_pooling():
    model, batch = _model(), _batch()
    table = jax.random.normal(jax.random.key(1), (8, 64))
    variables = model.init(jax.random.key(0), batch, table)
    g = model.apply(variables, batch, table, method=rsllm.RSLLM.target_tower)
    changed = dict(batch, target_tokens=batch["target_tokens"].copy())
    changed["target_tokens"][0, 2] = 5  # A padding position of row 0.
    np.testing.assert_allclose(
        model.apply(variables, changed, table, method=rsllm.RSLLM.target_tower)[0], g[0], rtol=1e-5)


def test_a_bf16_base_keeps_the_trained_parameters_float32():
    config = llama.get_config("tiny", vocab_size=64, hidden_size=32, intermediate_size=48,
                              num_heads=4, num_kv_heads=2, param_dtype="bfloat16",
                              lora=lora.LoraConfig(rank=2, alpha=4))
    model, batch = rsllm.RSLLM(config, num_new_tokens=3), _batch()
    variables = nn.unbox(model.init(jax.random.key(0), batch, jnp.zeros((8, 64))))
    dtypes = {
        name: {leaf.dtype
               for leaf in jax.tree.leaves(variables[name])}
        for name in ("params", "lora", "adapter")
    }
    assert dtypes == {
        "params": {jnp.dtype(jnp.bfloat16)}, "lora": {jnp.dtype(jnp.float32)},
        "adapter": {jnp.dtype(jnp.float32)}
    }
    out = model.apply(variables, batch, jnp.zeros((8, 64)))
    assert np.isfinite(np.asarray(out["nip_logits"])).all()


def test_projector_equals_llara_torch_projector_and_its_init():
    """LLaRA's MlpProjector: nn.Linear(64, d), nn.GELU() (exact), nn.Linear(d, d), with
    PyTorch's default init (uniform ±1/sqrt(fan_in), weights and biases)."""
    import torch

    d_in, d = 64, 48
    params = nn.unbox(rsllm.Projector(d).init(jax.random.key(3), jnp.zeros((1, d_in))))
    p = params[rsllm.ADAPTER]
    for name, fan_in in (("w1", d_in), ("b1", d_in), ("w2", d), ("b2", d)):
        values = np.asarray(p[name])
        bound = fan_in**-0.5
        assert np.abs(values).max() <= bound
        # Uniform on ±bound: its std is bound/sqrt(3) (lecun_normal's would be sqrt(3)× that).
        np.testing.assert_allclose(values.std(), bound / np.sqrt(3), rtol=0.25)
    reference = torch.nn.Sequential(torch.nn.Linear(d_in, d), torch.nn.GELU(),
                                    torch.nn.Linear(d, d))
    with torch.no_grad():
        reference[0].weight.copy_(torch.tensor(np.asarray(p["w1"]).T))
        reference[0].bias.copy_(torch.tensor(np.asarray(p["b1"])))
        reference[2].weight.copy_(torch.tensor(np.asarray(p["w2"]).T))
        reference[2].bias.copy_(torch.tensor(np.asarray(p["b2"])))
    e = np.random.default_rng(0).normal(size=(5, d_in)).astype(np.float32) * 3
    ours = rsllm.Projector(d).apply(params, e)
    np.testing.assert_allclose(np.asarray(ours),
                               reference(torch.tensor(e)).detach().numpy(), rtol=1e-5, atol=1e-6)
