"""Sharded forward and LoRA gradients on 8 simulated CPU devices equal the unsharded ones.

The device count must be fixed before JAX starts, so the checks run in a subprocess
(this file executed as a script) and the test only asserts that it succeeded.
"""

import os
import subprocess
import sys

MESHES = ((8, 1, 1), (2, 2, 2), (1, 4, 2))


def test_sharded_equals_unsharded():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    for shape in MESHES:
        assert f"mesh {shape} ok" in result.stdout


def _check():
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

    from rsllm_jax.checkpoint import hf as hf_ckpt  # pylint: disable=g-import-not-at-top
    from rsllm_jax.models import llama, lora as lora_lib  # pylint: disable=g-import-not-at-top
    from rsllm_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top

    assert jax.device_count() == 8
    config = llama.get_config(
        "tiny",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_heads=4,
        num_kv_heads=2,
        scan_layers=True,
        tie_word_embeddings=False,
        initializer_range=0.2,
        lora=lora_lib.LoraConfig(rank=4, alpha=8.0),
    )
    model = llama.Llama(config)
    sample = jnp.ones((1, 1), jnp.int32)
    variables = mesh_lib.init_sharded(model, jax.random.key(0), sample)
    variables["lora"] = jax.tree_util.tree_map(lambda x: x + 0.05, variables["lora"])  # non-zero B
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (8, 16)).astype(np.int32)
    mask = np.ones((8, 16), np.int32)
    mask[::2, :5] = 0  # left padding on half the rows
    at = np.tile(np.array([[15, 9]]), (8, 1))

    def forward(variables, tokens, mask):
        return model.apply(variables, tokens, attention_mask=mask, logits_at=at).logits

    def logits_and_lora_grad(lora, params, tokens, mask):

        def loss(lora):
            logits = forward({"params": params, "lora": lora}, tokens, mask)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 7]), logits

        (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(lora)
        return logits, grads

    ref_logits, ref_grads = jax.jit(logits_and_lora_grad)(variables["lora"], variables["params"],
                                                          tokens, mask)
    hf_names = hf_ckpt.hf_tensors(config, variables["params"])
    hf_numpy = {name: thunk() for name, thunk in hf_names.items()}

    for shape in MESHES:
        mesh = mesh_lib.make_mesh(shape)
        rules = mesh_lib.FSDP_TP_RULES
        sharded = mesh_lib.init_sharded(model, jax.random.key(0), sample, mesh=mesh, rules=rules)
        # Parameters are created in the shards the rules name.
        q = sharded["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
        assert q.sharding.spec == P(None, "fsdp", "tensor", None), q.sharding.spec
        assert q.addressable_shards[0].data.shape == (2, 64 // shape[1], 4 // shape[2], 16)
        emb = sharded["params"]["embed_tokens"]["embedding"]
        assert emb.sharding.spec == P("tensor", "fsdp")
        down_a = sharded["lora"]["layers"]["mlp"]["down_proj"]["a"]
        assert down_a.sharding.spec == P(None, "tensor", None)
        np.testing.assert_array_equal(
            q, variables["params"]["layers"]["self_attn"]["q_proj"]["kernel"])
        # Loading from HF-layout tensors gives the same sharded params.
        loaded = hf_ckpt.params_from_tensors(config, hf_numpy, mesh=mesh, rules=rules)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), loaded,
                               variables["params"])
        assert loaded["layers"]["mlp"]["gate_proj"]["kernel"].sharding.spec == P(
            None, "fsdp", "tensor")

        lora = jax.device_put(variables["lora"],
                              jax.tree_util.tree_map(lambda x: x.sharding, sharded["lora"]))
        data = NamedSharding(mesh, P(("data", "fsdp")))
        with mesh_lib.use_mesh(mesh, rules):
            t, m = jax.device_put(tokens, data), jax.device_put(mask, data)
            logits, grads = jax.jit(logits_and_lora_grad)(lora, loaded, t, m)
        # Activations follow the rules too: batch over data x fsdp, vocabulary over tensor.
        assert logits.sharding.shard_shape(logits.shape) == (
            8 // (shape[0] * shape[1]),
            2,
            256 // shape[2],
        )
        np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=1e-5)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4),
                               grads, ref_grads)
        print(f"mesh {shape} ok", flush=True)


if __name__ == "__main__":
    _check()
