"""Batched incremental decoding with a KV cache: one prefill, then one token per step.

Prompts are left-padded so every row's next token is written at the same cache slot; shapes
are static (prompt length, `max_new_tokens`), so each combination compiles once.

Free generation stops as LLaRA reads an answer (at least one new token; the text is stripped and
its first line kept): at a stop token (EOS), never as the first token, or at the end of the
first line, i.e. at a newline that follows non-whitespace text (`line_classes`), so an answer
that opens with a line break goes on to its text.

`generate_queued` answers many prompts a fixed number of slots at a time, the slot of each
ended answer taking the next prompt (its prompt written into the shared cache right before the
write index), so a long answer does not keep a whole batch decoding.

Besides free generation: constrained decoding (every row may only spell one of its own allowed
token sequences, a prefix trie evaluated with static shapes) and `score_continuations`, the
log-likelihood of several continuations per prompt with the prompt's KV cache computed once and
the continuations packed one after another (only their real tokens run);
`constrained_choice` reads the constrained greedy answer off that scoring pass.
"""

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rsllm_jax.models.llama import KVCache, Llama, init_cache, positions_from_mask


class Generation(NamedTuple):
    tokens: jax.Array  # (batch, max_new_tokens); `pad_id` after a row stopped
    lengths: jax.Array  # (batch,) generated tokens per row, stop token included
    logits: jax.Array | None  # (batch, max_new_tokens, vocab) float32 when requested


class Prefill(NamedTuple):
    """Left-padded prompts run into a KV cache, ready to be continued."""

    logits: jax.Array  # (batch, 1, vocab) float32 at each prompt's last token
    cache: KVCache  # the prompts written; room for `room` more tokens
    next_position: jax.Array  # (batch, 1) position id of the first continuation token


def _slot_axis(cache: KVCache) -> int:
    """The slots' axis of the cache's keys and values: one buffer per layer, or stacked."""
    return 2 if isinstance(cache.k, tuple) else 3


def _grow(cache: KVCache, length: int) -> KVCache:
    """The cache with `length` more slots at its end, zero and invalid."""

    def pad(x, axis):
        return jnp.pad(x, [(0, length) if a == axis else (0, 0) for a in range(x.ndim)])

    axis = _slot_axis(cache)
    k, v = (jax.tree.map(lambda x: pad(x, axis), kv) for kv in (cache.k, cache.v))
    return cache._replace(k=k, v=v, valid=pad(cache.valid, 1))


def _repeat(cache: KVCache, batch: int) -> KVCache:
    """A batch-1 cache repeated `batch` times."""
    axis = _slot_axis(cache) - 2  # (batch, kv heads, slots, head dim), after layers if stacked.
    k, v = (jax.tree.map(lambda x: jnp.repeat(x, batch, axis), kv) for kv in (cache.k, cache.v))
    return cache._replace(k=k, v=v, valid=jnp.repeat(cache.valid, batch, 0))


@functools.partial(jax.jit, static_argnames=("model", "room"))
def prefill(
    model: Llama,
    variables,
    tokens: jax.Array,
    attention_mask: jax.Array,
    *,
    room: int,
    embeddings: jax.Array | None = None,
    prefix: Prefill | None = None,
) -> Prefill:
    """Runs left-padded prompts (batch, length) once; `generate` and `score_continuations`
    can both continue from the result, so evaluation pays for each prompt once.

    `embeddings` (batch, length, embed) replaces the token lookup (prompts with injected
    behavioural embeddings). `prefix`, if given, is the `Prefill` (batch 1, no room) of a
    start every prompt shares, and `tokens` are what follows it: only they are run.
    """
    batch, prompt_len = tokens.shape
    positions = positions_from_mask(attention_mask)
    if prefix is None:
        cache = init_cache(model.config, batch, prompt_len + room)
    else:
        cache = _grow(_repeat(prefix.cache, batch), prompt_len + room)
        positions = positions + prefix.next_position
    out = model.apply(
        variables,
        None if embeddings is not None else tokens,
        embeddings=embeddings,
        positions=positions,
        attention_mask=attention_mask,
        logits_at=jnp.full((batch, 1), prompt_len - 1),
        cache=cache,
    )
    return Prefill(out.logits, out.cache, positions[:, -1:] + 1)


# Bits of `line_classes`, one entry per vocabulary id (see `token_line_classes`).
HAS_TEXT = 1  # The token's text has a non-whitespace character.
NEWLINE = 2  # It contains a line break.
TEXT_THEN_NEWLINE = 4  # A non-whitespace character comes before its first line break.


def token_line_classes(token_texts, vocab_size):
    """(vocab_size,) int32 bits of HAS_TEXT / NEWLINE / TEXT_THEN_NEWLINE per token id, from
    each id's decoded text (`token_texts[i]`; ids past the list get 0)."""
    classes = np.zeros(vocab_size, np.int32)
    for i, text in enumerate(token_texts[:vocab_size]):
        head = text.split("\n", 1)[0]
        classes[i] = (HAS_TEXT * bool(text.strip()) + NEWLINE * ("\n" in text) + TEXT_THEN_NEWLINE *
                      ("\n" in text and bool(head.strip())))
    return classes


def _ends(token, stop, line_classes, seen_text):
    """Whether each row's new `token` ends it (a stop token, or the end of the answer's first
    line when `line_classes` is given), and `seen_text` updated with it."""
    ended = jnp.isin(token, stop)
    if line_classes is not None:
        bits = jnp.take(line_classes, token)
        ended = ended | (((bits & NEWLINE) > 0) & (seen_text | ((bits & TEXT_THEN_NEWLINE) > 0)))
        seen_text = seen_text | ((bits & HAS_TEXT) > 0)
    return ended, seen_text


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
        "vocab_limit",
        "min_new_tokens",
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
    embeddings: jax.Array | None = None,
    allowed: jax.Array | None = None,
    vocab_limit: int | None = None,
    prefilled: Prefill | None = None,
    min_new_tokens: int = 0,
    line_classes: jax.Array | None = None,
) -> Generation:
    """Continues left-padded prompts (batch, length): greedy when `temperature` is 0.

    A row stops after emitting any of `stop_tokens`; the loop ends when every row stopped.
    `variables` holds `params` (and `lora` if the model has adapters).

    Args:
      embeddings: (batch, length, embed) input embeddings of the prompt, used instead of
        looking `tokens` up (prompts with injected behavioural embeddings); generated tokens
        are embedded by the model as usual.
      allowed: (batch, choices, steps) int token sequences, -1 after each one's end:
        constrained decoding, each row emits a prefix of one of its own sequences (a prefix
        trie: at step t only the t-th tokens of the sequences that agree with everything
        emitted so far are allowed). End each sequence with a stop token.
      vocab_limit: never emit token ids >= this (tokens added to the vocabulary for prompts).
      prefilled: these prompts already run by `prefill` (with room >= max_new_tokens).
      min_new_tokens: the stop tokens cannot be emitted before this many new tokens (LLaRA
        generates at least one; free generation only, not with `allowed`).
      line_classes: (vocab,) bits from `token_line_classes`: a row also stops at the end of
        its answer's first line, at a token with a line break once non-whitespace text was
        emitted (before the break in this token or in an earlier one). Leading line breaks
        do not stop it.
    """
    config = model.config
    batch, prompt_len = tokens.shape
    if rng is None:
        rng = jax.random.key(0)
    if prefilled is None:
        prefilled = prefill(model, variables, tokens, attention_mask, room=max_new_tokens,
                            embeddings=embeddings)
    elif prefilled.cache.valid.shape[1] - prompt_len < max_new_tokens:
        raise ValueError(
            f"the prefilled cache has room for {prefilled.cache.valid.shape[1] - prompt_len} new "
            f"tokens, fewer than max_new_tokens={max_new_tokens}")
    stop = jnp.asarray(stop_tokens or (-1, ), jnp.int32)
    if allowed is not None:
        allowed = jnp.asarray(allowed, jnp.int32)
        if allowed.shape[2] > max_new_tokens:
            raise ValueError(
                f"allowed sequences of {allowed.shape[2]} tokens need max_new_tokens >= that, "
                f"got {max_new_tokens}")
    rows = jnp.arange(batch)[:, None]

    def restrict(logits, step, alive):
        if vocab_limit is not None:
            logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
        if allowed is None:
            if min_new_tokens and stop_tokens:
                is_stop = jnp.zeros(logits.shape[-1], bool).at[stop].set(True)
                logits = jnp.where(is_stop & (step < min_new_tokens), -jnp.inf, logits)
            return logits
        column = jax.lax.dynamic_index_in_dim(allowed, step, axis=2, keepdims=False)
        ok = alive & (column >= 0)
        permitted = jnp.zeros(logits.shape,
                              jnp.int32).at[rows, jnp.maximum(column, 0)].max(ok.astype(jnp.int32))
        return jnp.where(permitted > 0, logits, -jnp.inf)

    def body(state):
        (step, logits, cache, position, done, generated, all_logits, rng, alive, seen_text,
         lengths) = state
        rng, step_rng = jax.random.split(rng)
        step_logits = restrict(logits[:, 0], step, alive)
        token = jnp.where(done, pad_id, _sample(step_logits, step_rng, temperature, top_k))
        generated = generated.at[:, step].set(token)
        if return_logits:
            all_logits = all_logits.at[:, step].set(logits[:, 0])
        if allowed is not None:
            column = jax.lax.dynamic_index_in_dim(allowed, step, axis=2, keepdims=False)
            alive = alive & (column == token[:, None])
        ended, seen_text = _ends(token, stop, line_classes, seen_text)
        lengths = jnp.where(ended & ~done, step + 1, lengths)
        done = done | ended
        out = model.apply(
            variables,
            token[:, None],
            positions=position,
            attention_mask=jnp.ones((batch, 1), bool),
            cache=cache,
            logits_at=jnp.zeros((batch, 1), jnp.int32),
        )
        return (
            step + 1,
            out.logits,
            out.cache,
            position + 1,
            done,
            generated,
            all_logits,
            rng,
            alive,
            seen_text,
            lengths,
        )

    def cond(state):
        step, done = state[0], state[4]
        return (step < max_new_tokens) & ~jnp.all(done)

    all_logits = jnp.zeros((batch, max_new_tokens, config.vocab_size) if return_logits else (0, ),
                           jnp.float32)
    state = (
        jnp.zeros((), jnp.int32),
        prefilled.logits,
        prefilled.cache,
        prefilled.next_position,
        jnp.zeros((batch, ), bool),
        jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
        all_logits,
        rng,
        jnp.ones((batch, 1 if allowed is None else allowed.shape[1]), bool),
        jnp.zeros((batch, ), bool),
        jnp.full((batch, ), max_new_tokens, jnp.int32),  # Rows that never stop: all steps.
    )
    if line_classes is not None:
        line_classes = jnp.asarray(line_classes, jnp.int32)
    state = jax.lax.while_loop(cond, body, state)
    return Generation(state[5], state[10], state[6] if return_logits else None)


class _Slots(NamedTuple):
    """The device state of `generate_queued`: one row per slot, each holding one prompt."""

    cache: KVCache  # one shared write index; each row's prompt ends where it was inserted
    logits: jax.Array  # (slots, 1, vocab) next-token logits
    position: jax.Array  # (slots, 1) position id of the next token
    step: jax.Array  # (slots,) tokens generated so far
    done: jax.Array  # (slots,) bool: the row ended, or the slot is empty
    seen_text: jax.Array  # (slots,) bool: the answer has non-whitespace text (line rule)
    generated: jax.Array  # (slots, max_new_tokens) int32
    lengths: jax.Array  # (slots,) tokens of an ended row, its stop token included


def _set_row(array, slot, row):
    return jax.lax.dynamic_update_index_in_dim(array, row.astype(array.dtype), slot, 0)


@functools.partial(jax.jit, donate_argnames=("state", ))
def _insert(state: _Slots, prefilled: Prefill, slot: jax.Array) -> _Slots:
    """Puts one prefilled prompt (batch 1, its cache exactly its length) in row `slot`: its
    keys end just before the shared write index, every other slot of the row is invalid."""
    cache = state.cache
    length = prefilled.cache.valid.shape[1]
    start = cache.index - length
    layered = isinstance(cache.k, tuple)  # One buffer per layer, or stacked (scan_layers).
    at = (slot, 0, start, 0) if layered else (0, slot, 0, start, 0)

    def write(buffers, new):
        if layered:
            return tuple(
                jax.lax.dynamic_update_slice(b, n.astype(b.dtype), at)
                for b, n in zip(buffers, new))
        return jax.lax.dynamic_update_slice(buffers, new.astype(buffers.dtype), at)

    row_valid = jax.lax.dynamic_update_slice(jnp.zeros(cache.valid.shape[1], bool),
                                             prefilled.cache.valid[0], (start, ))
    cache = cache._replace(k=write(cache.k, prefilled.cache.k), v=write(cache.v, prefilled.cache.v),
                           valid=_set_row(cache.valid, slot, row_valid))
    return _Slots(
        cache=cache,
        logits=_set_row(state.logits, slot, prefilled.logits[0]),
        position=_set_row(state.position, slot, prefilled.next_position[0]),
        step=_set_row(state.step, slot, jnp.zeros(())),
        done=_set_row(state.done, slot, jnp.zeros((), bool)),
        seen_text=_set_row(state.seen_text, slot, jnp.zeros((), bool)),
        generated=state.generated,
        lengths=state.lengths,
    )


@functools.partial(jax.jit, donate_argnames=("state", ))
def _shift_left(state: _Slots, shift: jax.Array) -> _Slots:
    """Moves every cache row `shift` slots left (the oldest, no longer used, fall off), making
    room at the end: causality and validity only depend on the slots' order."""
    cache = state.cache
    roll = lambda x: jnp.roll(x, -shift, axis=_slot_axis(cache))  # noqa: E731
    kept = jnp.arange(cache.valid.shape[1]) < cache.valid.shape[1] - shift
    cache = cache._replace(k=jax.tree.map(roll, cache.k), v=jax.tree.map(roll, cache.v),
                           valid=jnp.roll(cache.valid, -shift, axis=1) & kept[None],
                           index=cache.index - shift)
    return state._replace(cache=cache)


@functools.partial(
    jax.jit, static_argnames=("model", "max_new_tokens", "stop_tokens", "pad_id", "vocab_limit",
                              "min_new_tokens"), donate_argnames=("state", ))
def _decode_slots(model, variables, state: _Slots, max_steps, until_a_row_ends, line_classes, *,
                  max_new_tokens, stop_tokens, pad_id, vocab_limit, min_new_tokens) -> _Slots:
    """Greedy steps of every live row, at most `max_steps`, until every row ended or, when
    `until_a_row_ends`, one did (its slot can then take the next prompt)."""
    slots = state.done.shape[0]
    stop = jnp.asarray(stop_tokens or (-1, ), jnp.int32)
    vocab = jnp.arange(state.logits.shape[-1])
    is_stop = jnp.isin(vocab, stop)
    allowed = True if vocab_limit is None else vocab < vocab_limit

    def body(carry):
        count, ended_any, s = carry
        logits = jnp.where(allowed, s.logits[:, 0], -jnp.inf)
        logits = jnp.where(is_stop & (s.step < min_new_tokens)[:, None], -jnp.inf, logits)
        token = jnp.where(s.done, pad_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
        column = jnp.where(s.done, max_new_tokens, s.step)  # Out of range: not written.
        generated = s.generated.at[jnp.arange(slots), column].set(token, mode="drop")
        ended, seen_text = _ends(token, stop, line_classes, s.seen_text)
        ended = (ended | (s.step + 1 >= max_new_tokens)) & ~s.done
        out = model.apply(variables, token[:, None], positions=s.position,
                          attention_mask=~s.done[:, None], cache=s.cache, logits_at=jnp.zeros(
                              (slots, 1), jnp.int32))
        live = (~s.done).astype(jnp.int32)
        s = _Slots(cache=out.cache, logits=out.logits, position=s.position + live[:, None],
                   step=s.step + live, done=s.done | ended, seen_text=seen_text,
                   generated=generated, lengths=jnp.where(ended, s.step + 1, s.lengths))
        return count + 1, ended_any | jnp.any(ended), s

    def cond(carry):
        count, ended_any, s = carry
        return (count < max_steps) & ~jnp.all(s.done) & ~(until_a_row_ends & ended_any)

    return jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), jnp.zeros((), bool), state))[2]


def generate_queued(
    model: Llama,
    variables,
    prompts: Sequence,
    *,
    slots: int,
    max_new_tokens: int,
    stop_tokens: tuple[int, ...] = (),
    pad_id: int = 0,
    vocab_limit: int | None = None,
    min_new_tokens: int = 0,
    line_classes: np.ndarray | None = None,
    progress=None,
    each_prefill=None,
    prefix: Prefill | None = None,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Greedy answers to many prompts, `slots` at a time, each ended row's slot taking the
    next prompt at once: no step is spent on rows that ended while another row of their batch
    goes on, as in `generate` over fixed batches (one long answer keeps its whole batch).

    `prompts[i]` is `(tokens, attention_mask, embeddings or None)` of one left-padded prompt,
    batch 1 (pad it to a few lengths only: each compiles `prefill` once). The stop rule is
    `generate`'s (`stop_tokens`, `min_new_tokens`, `line_classes`, `vocab_limit`). Returns each
    prompt's generated tokens (the stop token included) and their counts; `progress(n)`, if
    given, hears the number of prompts answered after each decoding call. `each_prefill(i,
    prefilled)`, if given, is handed each prompt's `Prefill` before it joins the slots, so
    other measures can continue the same prompt cache. `prefix`, if given, is the `Prefill` of
    a start all prompts share, which `prompts` continue (see `prefill`).

    All rows share the cache's write index: a prompt of length P goes into slots
    [index - P, index) of its row, so the causal mask over slots and the validity of each
    slot are all the model needs. When the index reaches the end of the cache, every row
    moves left past slots no live row still reads.
    """
    config = model.config
    if not prompts:
        return [], np.zeros(0, np.int32)
    shared = 0 if prefix is None else prefix.cache.valid.shape[1]
    longest = shared + max(p[0].shape[1] for p in prompts)
    # A row spans at most its prompt and max_new_tokens answers; another max_new_tokens of
    # room lets decoding run that far between two moves.
    capacity = longest + 2 * max_new_tokens
    cache = init_cache(config, slots, capacity)._replace(index=jnp.asarray(longest, jnp.int32))
    state = _Slots(cache=cache, logits=jnp.zeros((slots, 1, config.vocab_size), jnp.float32),
                   position=jnp.zeros((slots, 1), jnp.int32), step=jnp.zeros(slots, jnp.int32),
                   done=jnp.ones(slots, bool), seen_text=jnp.zeros(slots, bool), generated=jnp.full(
                       (slots, max_new_tokens), pad_id,
                       jnp.int32), lengths=jnp.zeros(slots, jnp.int32))
    if line_classes is not None:
        line_classes = jnp.asarray(line_classes, jnp.int32)
    answers, lengths = [None] * len(prompts), np.zeros(len(prompts), np.int32)
    prompt_of_slot, start_of_slot = [None] * slots, [0] * slots
    index, queue = longest, list(range(len(prompts)))[::-1]
    while queue or any(p is not None for p in prompt_of_slot):
        for slot in range(slots):
            if prompt_of_slot[slot] is None and queue:
                i = queue.pop()
                tokens, mask, embeddings = prompts[i]
                prefilled = prefill(model, variables, tokens, mask, room=0, embeddings=embeddings,
                                    prefix=prefix)
                if each_prefill is not None:
                    each_prefill(i, prefilled)
                state = _insert(state, prefilled, jnp.asarray(slot, jnp.int32))
                prompt_of_slot[slot] = i
                start_of_slot[slot] = index - prefilled.cache.valid.shape[1]  # The prefix too.
        if index == capacity:  # Move left past the oldest slot a live row reads.
            shift = min(
                min(start_of_slot[s] for s in range(slots) if prompt_of_slot[s] is not None),
                index - longest)
            state = _shift_left(state, jnp.asarray(shift, jnp.int32))
            index -= shift
            start_of_slot = [start - shift for start in start_of_slot]
        state = _decode_slots(model, variables, state, jnp.asarray(capacity - index, jnp.int32),
                              jnp.asarray(bool(queue)), line_classes, max_new_tokens=max_new_tokens,
                              stop_tokens=tuple(stop_tokens), pad_id=pad_id,
                              vocab_limit=vocab_limit, min_new_tokens=min_new_tokens)
        index, done, generated, counts = jax.device_get(
            (state.cache.index, state.done, state.generated, state.lengths))
        index = int(index)
        for slot, i in enumerate(prompt_of_slot):
            if i is not None and done[slot]:
                answers[i], lengths[i] = generated[slot, :counts[slot]].copy(), counts[slot]
                prompt_of_slot[slot] = None
        if progress is not None:
            progress(sum(answer is not None for answer in answers))
    return answers, lengths


class Packed(NamedTuple):
    """Each row's continuations (a row's `choices` × `steps` grid) packed one after another:
    only their real tokens, not every choice padded to the longest."""

    tokens: np.ndarray  # (batch, length) int32; 0 in the padding after the last one
    segments: np.ndarray  # (batch, length) int32 choice of each token; -1 in the padding
    offsets: np.ndarray  # (batch, length) int32 step of each token within its choice


def pack_continuations(continuations: np.ndarray, continuation_mask: np.ndarray,
                       multiple_of: int = 32) -> Packed:
    """Packs right-padded continuations (batch, choices, steps) into rows of their real tokens,
    the rows padded to the longest, rounded up to `multiple_of` (a few shapes compile)."""
    batch, choices, steps = continuations.shape
    lengths = continuation_mask.sum(axis=2)
    length = max(1, -(-int(lengths.sum(axis=1).max(initial=0)) // multiple_of) * multiple_of)
    tokens = np.zeros((batch, length), np.int32)
    segments = np.full((batch, length), -1, np.int32)
    offsets = np.zeros((batch, length), np.int32)
    for row in range(batch):
        at = 0
        for choice in range(choices):
            n = int(lengths[row, choice])
            tokens[row, at:at + n] = continuations[row, choice, :n]
            segments[row, at:at + n] = choice
            offsets[row, at:at + n] = np.arange(n)
            at += n
    return Packed(tokens, segments, offsets)


@functools.partial(jax.jit, static_argnames=("model", ))
def score_packed(model: Llama, variables, prefilled: Prefill,
                 packed: Packed) -> tuple[jax.Array, jax.Array]:
    """(log p, logit) of every packed token (batch, length; 0 in the padding) given its prompt
    and the earlier tokens of its own continuation, in one forward pass over the packed rows.

    Every token reads the prompt's cache (extended by `length` slots for the packed tokens:
    `prefill` needs no room) and its own continuation's earlier tokens (`segment_ids`). A
    continuation's first token is predicted by the prompt's last logits, each later one by
    its predecessor's.
    """
    tokens, segments, offsets = (jnp.asarray(x) for x in packed)
    cache = _grow(prefilled.cache, tokens.shape[1])
    real = segments >= 0
    out = model.apply(variables, tokens, positions=prefilled.next_position + offsets,
                      attention_mask=real, cache=cache, segment_ids=segments)
    before = jnp.concatenate([prefilled.logits, out.logits[:, :-1]], axis=1)
    predicting = jnp.where((offsets == 0)[..., None], prefilled.logits, before)
    # log p = logit - logsumexp: no (rows, length, vocab) log-softmax copy.
    picked = jnp.take_along_axis(predicting, tokens[..., None], axis=-1)[..., 0]
    log_probs = picked - jax.nn.logsumexp(predicting, axis=-1)
    return jnp.where(real, log_probs, 0.0), jnp.where(real, picked, 0.0)


def unpack_scores(packed: Packed, log_probs, logits, choices: int,
                  steps: int) -> tuple[np.ndarray, np.ndarray]:
    """`score_packed`'s per-token results back on the grid: each continuation's
    log-likelihood (batch, choices), and each of its tokens' logit (batch, choices, steps)."""
    log_probs, logits = np.asarray(log_probs), np.asarray(logits)
    rows, at = np.nonzero(packed.segments >= 0)
    segments, offsets = packed.segments[rows, at], packed.offsets[rows, at]
    scores = np.zeros((len(packed.tokens), choices), np.float32)
    np.add.at(scores, (rows, segments), log_probs[rows, at])
    token_logits = np.zeros((len(packed.tokens), choices, steps), np.float32)
    token_logits[rows, segments, offsets] = logits[rows, at]
    return scores, token_logits


def score_continuations(model: Llama, variables, prefilled: Prefill, continuations: np.ndarray,
                        continuation_mask: np.ndarray,
                        token_logits: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Log-likelihoods (batch, choices) of each row's right-padded continuations (batch,
    choices, steps; `continuation_mask` false after each one's end) given its prompt: the sum
    of log p(token | prompt, earlier continuation tokens) over the continuation's tokens.

    The continuations are packed (`pack_continuations`) and scored in one forward pass on the
    prompt's cache (`score_packed`). With `token_logits`, also returns the logit of each
    continuation token (batch, choices, steps; 0 after its end), from which
    `constrained_choice` decodes.
    """
    continuations, continuation_mask = np.asarray(continuations), np.asarray(continuation_mask)
    packed = pack_continuations(continuations, continuation_mask)
    scores, logits = unpack_scores(packed, *score_packed(model, variables, prefilled, packed),
                                   *continuations.shape[1:])
    return (scores, logits) if token_logits else scores


def constrained_choice(continuations: np.ndarray, continuation_mask: np.ndarray,
                       token_logits: np.ndarray) -> np.ndarray:
    """(batch,) index of the continuation that greedy decoding restricted to each row's
    continuations (`generate` with `allowed`) spells, read from one scoring pass.

    `token_logits` (batch, choices, steps) comes from `score_continuations(...,
    token_logits=True)`; every continuation ends with a stop token. At step t, constrained
    greedy decoding emits the highest-logit token among the t-th tokens of the continuations
    that agree with everything emitted so far (the lowest id on a tie, as argmax). Those
    continuations share that prefix, so teacher forcing gave each the distribution decoding
    would see: the logit of its own t-th token is that token's logit there (up to float
    rounding between rows). Continuations that spell the same tokens are one answer; the first
    is returned. Costs no decoding step: the ranking's forward pass already computed it.
    """
    batch, choices, steps = continuations.shape
    chosen = np.zeros(batch, np.int64)
    for row in range(batch):
        alive = np.ones(choices, bool)  # Agree with every token emitted so far.
        for step in range(steps):
            going_on = alive & continuation_mask[row, :, step]
            if not going_on.any():  # Every alive continuation ended (at its stop token).
                break
            tokens = continuations[row, going_on, step]
            logits = token_logits[row, going_on, step]
            token = tokens[logits == logits.max()].min()
            alive = going_on & (continuations[row, :, step] == token)
        chosen[row] = np.flatnonzero(alive)[0]
    return chosen


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int,
             multiple_of: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists to a common length (rounded up to limit recompilation)."""
    length = max(len(s) for s in sequences)
    length = -(-length // multiple_of) * multiple_of
    tokens = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    for i, s in enumerate(sequences):
        if s:
            tokens[i, length - len(s):] = s
            mask[i, length - len(s):] = 1
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
    pad_id = (tokenizer.pad_token_id if tokenizer.pad_token_id is not None else
              (config.pad_token_id or 0))
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
