"""Logit parity of our Llama with transformers' LlamaForCausalLM (fp32, random tiny configs)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_reference import hf_config, hf_logits, left_padded_batch, random_hf_model
from rsllm_jax.checkpoint import hf as hf_ckpt
from rsllm_jax.models import llama

TOL = 1e-4


@functools.lru_cache(maxsize=None)
def _reference(tie, llama3, tmp_root):
    config = hf_config(tie=tie, llama3=llama3)
    model = random_hf_model(config, seed=int(tie) + 2 * int(llama3))
    path = f"{tmp_root}/hf_tie{tie}_l3{llama3}"
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf"))


def _forward(config, params, tokens, mask=None, positions=None, logits_at=None):
    model = llama.Llama(config)

    @jax.jit
    def run(params, tokens, mask, positions, logits_at):
        return model.apply(
            {"params": params},
            tokens,
            attention_mask=mask,
            positions=positions,
            logits_at=logits_at,
        )

    return run(params, tokens, mask, positions, logits_at)


@pytest.mark.parametrize(
    "tie,llama3,scan",
    [(False, False, False), (True, False, True), (False, True, False)],
    ids=["gqa", "tied_scan", "llama3_rope"],
)
def test_logits_match_transformers(tmp_root, tie, llama3, scan):
    reference, path = _reference(tie, llama3, tmp_root)
    config, params = hf_ckpt.load_hf(path, scan_layers=scan)
    assert config.tie_word_embeddings == tie
    assert (config.rope_scaling is not None) == llama3
    rng = np.random.default_rng(0)

    tokens = rng.integers(0, config.vocab_size, (2, 12)).astype(np.int32)
    ours = _forward(config, params, tokens).logits
    np.testing.assert_allclose(ours, hf_logits(reference, tokens), atol=TOL, rtol=0)

    # Left padding: explicit positions make padded rows exact at every real position.
    tokens, mask, positions = left_padded_batch(rng, [12, 7, 3], 12, config.vocab_size)
    ours = np.asarray(_forward(config, params, tokens, mask).logits)
    theirs = hf_logits(reference, tokens, mask, positions)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], theirs[real], atol=TOL, rtol=0)
    # Each padded row equals the same sequence run unpadded.
    for i, n in enumerate([12, 7, 3]):
        alone = hf_logits(reference, tokens[i:i + 1, 12 - n:])
        np.testing.assert_allclose(ours[i, 12 - n:], alone[0], atol=TOL, rtol=0)


def test_logits_at_positions_and_embedding_input(tmp_root):
    _, path = _reference(False, False, tmp_root)
    config, params = hf_ckpt.load_hf(path)
    model = llama.Llama(config)
    rng = np.random.default_rng(1)
    tokens, mask, _ = left_padded_batch(rng, [9, 5], 9, config.vocab_size)
    full = model.apply({"params": params}, tokens, attention_mask=mask)
    at = np.array([[8, 3], [8, 6]])
    picked = model.apply({"params": params}, tokens, attention_mask=mask, logits_at=at)
    assert picked.logits.shape == (2, 2, config.vocab_size)
    np.testing.assert_allclose(picked.logits,
                               np.take_along_axis(np.asarray(full.logits), at[..., None], 1),
                               atol=1e-6)
    # Embeddings in place of tokens give the same result.
    embeddings = model.apply({"params": params}, tokens, method=llama.Llama.embed)
    from_embeddings = model.apply({"params": params}, embeddings=embeddings, attention_mask=mask,
                                  logits_at=at)
    np.testing.assert_allclose(from_embeddings.logits, picked.logits, atol=1e-6)
    hidden_only = model.apply({"params": params}, tokens, attention_mask=mask, compute_logits=False)
    assert hidden_only.logits is None
    np.testing.assert_allclose(hidden_only.hidden_states, full.hidden_states, atol=1e-6)


def test_remat_and_bf16_are_consistent(tmp_root):
    _, path = _reference(False, False, tmp_root)
    config, params = hf_ckpt.load_hf(path)
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, (2, 10)).astype(np.int32)
    base = _forward(config, params, tokens).logits

    def loss(config, params):
        return llama.Llama(config).apply({"params": params}, tokens).logits.std()

    grads = jax.jit(jax.grad(functools.partial(loss, config)))(params)
    remat = config.replace(remat_policy="full", scan_layers=True)
    _, remat_params = hf_ckpt.load_hf(path, remat_policy="full", scan_layers=True)
    remat_grads = jax.jit(jax.grad(functools.partial(loss, remat)))(remat_params)
    np.testing.assert_allclose(
        remat_grads["layers"]["mlp"]["down_proj"]["kernel"][1],
        grads["layers_1"]["mlp"]["down_proj"]["kernel"],
        atol=1e-5,
    )
    bf16_config, bf16_params = hf_ckpt.load_hf(path, param_dtype="bfloat16", dtype="bfloat16")
    assert bf16_params["embed_tokens"]["embedding"].dtype == jnp.bfloat16
    bf16 = _forward(bf16_config, bf16_params, tokens).logits
    assert bf16.dtype == jnp.float32
    # bf16 compute tracks fp32 to bf16 precision, not better.
    assert np.abs(np.asarray(bf16) - np.asarray(base)).max() < 0.1 * np.abs(np.asarray(base)).max()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("heads,kv_heads,length", [(6, 2, 1), (6, 2, 5), (4, 4, 3)])
def test_cached_attention_equals_dot_product_attention(dtype, heads, kv_heads, length):
    """The cache-layout attention computes what jax.nn.dot_product_attention's XLA
    implementation computes on the same keys in its own layout: grouped heads, a mask with
    padding and causality, float32 softmax."""
    rng = np.random.default_rng(0)
    batch, slots, head_dim = 3, 11, 8
    q = jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), dtype)
    k = jnp.asarray(rng.normal(size=(batch, kv_heads, slots, head_dim)), dtype)
    v = jnp.asarray(rng.normal(size=(batch, kv_heads, slots, head_dim)), dtype)
    valid = rng.random((batch, slots)) < 0.8
    causal = np.arange(slots)[None] <= (slots - length + np.arange(length))[:, None]
    mask = jnp.asarray((valid[:, None] & causal[None])[:, None]
                       | np.eye(length, slots, slots - length, bool)[None, None])
    ours = llama.cached_attention(q, k, v, mask, head_dim**-0.5)
    reference = jax.nn.dot_product_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                                             mask=mask, scale=head_dim**-0.5, implementation="xla")
    assert ours.shape == reference.shape and ours.dtype == reference.dtype
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(reference, np.float32),
                               atol=1e-6 if dtype == "float32" else 1e-2)


def test_config_errors():
    with pytest.raises(ValueError, match="num_kv_heads"):
        llama.LlamaConfig(num_heads=4, num_kv_heads=3, hidden_size=64)
    with pytest.raises(ValueError, match="rope scaling"):
        llama.RopeScaling(rope_type="yarn")
    with pytest.raises(ValueError, match="attention_bias"):
        hf_ckpt.config_from_hf(dict(hf_config().to_dict(), attention_bias=True))
    with pytest.raises(ValueError, match="Unknown model preset"):
        llama.get_config("huge")
