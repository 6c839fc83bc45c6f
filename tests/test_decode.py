"""KV-cache decoding agrees with repeated full forwards (tokens and logits)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsllm_jax.models import decode, llama
from rsllm_jax.parallel import mesh as mesh_lib


@pytest.fixture(scope="module")
def tiny():
    config = llama.get_config(
        "tiny", vocab_size=97, hidden_size=64, intermediate_size=96, initializer_range=0.2
    )
    model = llama.Llama(config)
    params = mesh_lib.init_sharded(model, jax.random.key(0), jnp.ones((1, 1), jnp.int32))["params"]
    return model, {"params": params}


def _reference_greedy(model, variables, tokens, mask, steps):
    """Greedy decoding by re-running the whole (growing) sequence each step."""
    # One fixed shape (prompt + all steps): causality makes the not-yet-generated tail irrelevant.
    batch, length = tokens.shape
    forward = jax.jit(
        lambda t, m, at: model.apply(variables, t, attention_mask=m, logits_at=at).logits[:, 0]
    )
    tokens = np.concatenate([tokens, np.zeros((batch, steps), np.int32)], axis=1)
    mask = np.concatenate([mask, np.ones((batch, steps), np.int32)], axis=1)
    out_tokens, out_logits = [], []
    for step in range(steps):
        logits = np.asarray(forward(tokens, mask, np.full((batch, 1), length - 1 + step)))
        nxt = logits.argmax(-1).astype(np.int32)
        out_tokens.append(nxt)
        out_logits.append(logits)
        tokens[:, length + step] = nxt
    return np.stack(out_tokens, 1), np.stack(out_logits, 1)


@pytest.mark.parametrize("scan", [False, True])
def test_cached_greedy_equals_full_forward(tiny, scan):
    model, variables = tiny
    if scan:  # same weights, stacked along a layers axis
        model = llama.Llama(model.config.replace(scan_layers=True))
        p = variables["params"]
        stacked = jax.tree_util.tree_map(
            lambda *xs: jnp.stack(xs), *[p[f"layers_{i}"] for i in range(model.config.num_layers)]
        )
        variables = {
            "params": {k: v for k, v in p.items() if not k.startswith("layers_")}
            | {"layers": stacked}
        }
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, 97, n)) for n in (6, 11, 3)]
    tokens, mask = decode.left_pad(prompts, pad_id=0)
    steps = 7
    result = decode.generate(
        model, variables, tokens, mask, max_new_tokens=steps, return_logits=True
    )
    ref_tokens, ref_logits = _reference_greedy(model, variables, tokens, mask, steps)
    np.testing.assert_array_equal(result.tokens, ref_tokens)
    np.testing.assert_allclose(result.logits, ref_logits, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(result.lengths, [steps] * 3)


def test_stop_tokens_and_sampling(tiny):
    model, variables = tiny
    tokens, mask = decode.left_pad([[5, 6, 7], [9, 10]], pad_id=0)
    greedy = decode.generate(model, variables, tokens, mask, max_new_tokens=6)
    stop = int(greedy.tokens[0, 2])
    stopped = decode.generate(
        model, variables, tokens, mask, max_new_tokens=6, stop_tokens=(stop,), pad_id=-1
    )
    row = np.asarray(stopped.tokens[0])
    first = int(np.argmax(np.asarray(greedy.tokens[0]) == stop))
    np.testing.assert_array_equal(row[: first + 1], np.asarray(greedy.tokens[0, : first + 1]))
    assert (row[first + 1 :] == -1).all()
    assert int(stopped.lengths[0]) == first + 1
    # Sampling: reproducible for a key, and at low temperature it is greedy.
    a = decode.generate(
        model, variables, tokens, mask, max_new_tokens=6, temperature=1.0, rng=jax.random.key(3)
    )
    b = decode.generate(
        model, variables, tokens, mask, max_new_tokens=6, temperature=1.0, rng=jax.random.key(3)
    )
    np.testing.assert_array_equal(a.tokens, b.tokens)
    c = decode.generate(
        model, variables, tokens, mask, max_new_tokens=6, temperature=1.0, rng=jax.random.key(4)
    )
    assert not np.array_equal(a.tokens, c.tokens)
