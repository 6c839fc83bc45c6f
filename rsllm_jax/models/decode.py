"""Batched incremental decoding with a KV cache: one prefill, then one token per step.

Prompts are left-padded so every row's next token is written at the same cache slot; shapes
are static (prompt length, `max_new_tokens`), so each combination compiles once.
"""

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rsllm_jax.models.llama import Llama, init_cache, positions_from_mask


class Generation(NamedTuple):
    tokens: jax.Array  # (batch, max_new_tokens); `pad_id` after a row stopped
    lengths: jax.Array  # (batch,) generated tokens per row, stop token included
    logits: jax.Array | None  # (batch, max_new_tokens, vocab) float32 when requested


def _sample(logits, rng, temperature, top_k):
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=(
        "model",
        "max_new_tokens",
        "temperature",
        "top_k",
        "stop_tokens",
        "pad_id",
        "return_logits",
    ),
)
def generate(
    model: Llama,
    variables,
    tokens: jax.Array,
    attention_mask: jax.Array,
    *,
    max_new_tokens: int,
    rng: jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    stop_tokens: tuple[int, ...] = (),
    pad_id: int = 0,
    return_logits: bool = False,
) -> Generation:
    """Continues left-padded prompts (batch, length): greedy when `temperature` is 0.

    A row stops after emitting any of `stop_tokens`; the loop ends when every row stopped.
    `variables` holds `params` (and `lora` if the model has adapters).
    """
    config = model.config
    batch, prompt_len = tokens.shape
    if rng is None:
        rng = jax.random.key(0)
    cache = init_cache(config, batch, prompt_len + max_new_tokens)
    positions = positions_from_mask(attention_mask)
    last = jnp.full((batch, 1), prompt_len - 1)
    out = model.apply(
        variables,
        tokens,
        positions=positions,
        attention_mask=attention_mask,
        logits_at=last,
        cache=cache,
    )
    next_position = positions[:, -1:] + 1
    stop = jnp.asarray(stop_tokens or (-1,), jnp.int32)

    def body(state):
        step, logits, cache, position, done, generated, all_logits, rng = state
        rng, step_rng = jax.random.split(rng)
        token = jnp.where(done, pad_id, _sample(logits[:, 0], step_rng, temperature, top_k))
        generated = generated.at[:, step].set(token)
        if return_logits:
            all_logits = all_logits.at[:, step].set(logits[:, 0])
        done = done | jnp.isin(token, stop)
        out = model.apply(
            variables,
            token[:, None],
            positions=position,
            attention_mask=jnp.ones((batch, 1), bool),
            cache=cache,
            logits_at=jnp.zeros((batch, 1), jnp.int32),
        )
        return step + 1, out.logits, out.cache, position + 1, done, generated, all_logits, rng

    def cond(state):
        step, done = state[0], state[4]
        return (step < max_new_tokens) & ~jnp.all(done)

    all_logits = jnp.zeros(
        (batch, max_new_tokens, config.vocab_size) if return_logits else (0,), jnp.float32
    )
    state = (
        jnp.zeros((), jnp.int32),
        out.logits,
        out.cache,
        next_position,
        jnp.zeros((batch,), bool),
        jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
        all_logits,
        rng,
    )
    state = jax.lax.while_loop(cond, body, state)
    generated = state[5]
    stopped = jnp.isin(generated, stop)
    first_stop = jnp.where(stopped.any(axis=1), jnp.argmax(stopped, axis=1) + 1, state[0])
    return Generation(generated, first_stop, state[6] if return_logits else None)


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, multiple_of: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists to a common length (rounded up to limit recompilation)."""
    length = max(len(s) for s in sequences)
    length = -(-length // multiple_of) * multiple_of
    tokens = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    for i, s in enumerate(sequences):
        if s:
            tokens[i, length - len(s) :] = s
            mask[i, length - len(s) :] = 1
    return tokens, mask


def generate_text(
    model: Llama,
    variables,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    stop_strings: Sequence[str] = (),
    stop_tokens: Sequence[int] | None = None,
    rng: jax.Array | None = None,
    add_special_tokens: bool = True,
) -> list[str]:
    """Generates a continuation for each prompt and cuts it at the first stop string.

    `stop_tokens` defaults to the config's EOS ids; they are not included in the text.
    """
    config = model.config
    if stop_tokens is None:
        stop_tokens = config.eos_token_ids
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (config.pad_token_id or 0)
    )
    encoded = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    tokens, mask = left_pad(encoded, pad_id)
    result = generate(
        model,
        variables,
        tokens,
        mask,
        max_new_tokens=max_new_tokens,
        rng=rng,
        temperature=temperature,
        top_k=top_k,
        stop_tokens=tuple(int(t) for t in stop_tokens),
        pad_id=int(pad_id),
    )
    texts = []
    for row, n in zip(np.asarray(result.tokens), np.asarray(result.lengths)):
        row = [int(t) for t in row[:n] if int(t) not in stop_tokens]
        text = tokenizer.decode(row, skip_special_tokens=True)
        cut = min((text.find(s) for s in stop_strings if s in text), default=len(text))
        texts.append(text[:cut])
    return texts
