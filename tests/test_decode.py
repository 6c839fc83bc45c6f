"""KV-cache decoding agrees with repeated full forwards (tokens and logits)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_softmax

from rsllm_jax.models import decode, llama
from rsllm_jax.parallel import mesh as mesh_lib


@pytest.fixture(scope="module")
def tiny():
    config = llama.get_config("tiny", vocab_size=97, hidden_size=64, intermediate_size=96,
                              initializer_range=0.2)
    model = llama.Llama(config)
    params = mesh_lib.init_sharded(model, jax.random.key(0), jnp.ones((1, 1), jnp.int32))["params"]
    return model, {"params": params}


def _reference_greedy(model, variables, tokens, mask, steps):
    """Greedy decoding by re-running the whole (growing) sequence each step."""
    # One fixed shape (prompt + all steps): causality makes the not-yet-generated tail irrelevant.
    batch, length = tokens.shape
    forward = jax.jit(
        lambda t, m, at: model.apply(variables, t, attention_mask=m, logits_at=at).logits[:, 0])
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


def _stacked(model, variables):
    """The same weights stacked along a layers axis (`scan_layers`)."""
    model = llama.Llama(model.config.replace(scan_layers=True))
    p = variables["params"]
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs),
                                     *[p[f"layers_{i}"] for i in range(model.config.num_layers)])
    layers = {k: v for k, v in p.items() if not k.startswith("layers_")}
    return model, {"params": layers | {"layers": stacked}}


@pytest.mark.parametrize("scan", [False, True])
def test_cached_greedy_equals_full_forward(tiny, scan):
    model, variables = tiny
    if scan:
        model, variables = _stacked(model, variables)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, 97, n)) for n in (6, 11, 3)]
    tokens, mask = decode.left_pad(prompts, pad_id=0)
    steps = 7
    result = decode.generate(model, variables, tokens, mask, max_new_tokens=steps,
                             return_logits=True)
    ref_tokens, ref_logits = _reference_greedy(model, variables, tokens, mask, steps)
    np.testing.assert_array_equal(result.tokens, ref_tokens)
    np.testing.assert_allclose(result.logits, ref_logits, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(result.lengths, [steps] * 3)


def test_stop_tokens_and_sampling(tiny):
    model, variables = tiny
    tokens, mask = decode.left_pad([[5, 6, 7], [9, 10]], pad_id=0)
    greedy = decode.generate(model, variables, tokens, mask, max_new_tokens=6)
    stop = int(greedy.tokens[0, 2])
    stopped = decode.generate(model, variables, tokens, mask, max_new_tokens=6,
                              stop_tokens=(stop, ), pad_id=-1)
    row = np.asarray(stopped.tokens[0])
    first = int(np.argmax(np.asarray(greedy.tokens[0]) == stop))
    np.testing.assert_array_equal(row[:first + 1], np.asarray(greedy.tokens[0, :first + 1]))
    assert (row[first + 1:] == -1).all()
    assert int(stopped.lengths[0]) == first + 1
    # Sampling: reproducible for a key, and at low temperature it is greedy.
    a = decode.generate(model, variables, tokens, mask, max_new_tokens=6, temperature=1.0,
                        rng=jax.random.key(3))
    b = decode.generate(model, variables, tokens, mask, max_new_tokens=6, temperature=1.0,
                        rng=jax.random.key(3))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    c = decode.generate(model, variables, tokens, mask, max_new_tokens=6, temperature=1.0,
                        rng=jax.random.key(4))
    assert not np.array_equal(a.tokens, c.tokens)


def test_left_padded_batch_equals_one_by_one(tiny):
    model, variables = tiny
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(3, 97, n)) for n in (4, 13, 9)]
    tokens, mask = decode.left_pad(prompts, pad_id=0)
    batched = decode.generate(model, variables, tokens, mask, max_new_tokens=6).tokens
    for row, prompt in enumerate(prompts):
        alone = np.asarray([prompt], np.int32)
        single = decode.generate(model, variables, alone, np.ones_like(alone), max_new_tokens=6)
        np.testing.assert_array_equal(np.asarray(batched[row]), np.asarray(single.tokens[0]))


def test_prefill_from_embeddings_equals_from_tokens(tiny):
    model, variables = tiny
    tokens, mask = decode.left_pad([[5, 6, 7, 8], [9, 10]], pad_id=0)
    embeddings = model.apply(variables, jnp.asarray(tokens), method=llama.Llama.embed)
    from_tokens = decode.generate(model, variables, tokens, mask, max_new_tokens=5)
    from_embeddings = decode.generate(model, variables, tokens, mask, max_new_tokens=5,
                                      embeddings=embeddings)
    np.testing.assert_array_equal(np.asarray(from_tokens.tokens),
                                  np.asarray(from_embeddings.tokens))


def test_vocab_limit_is_never_exceeded(tiny):
    model, variables = tiny
    tokens, mask = decode.left_pad([[5, 6, 7], [40, 41, 42, 43]], pad_id=0)
    out = decode.generate(model, variables, tokens, mask, max_new_tokens=8, vocab_limit=20)
    assert np.asarray(out.tokens).max() < 20


def test_constrained_decoding_only_spells_allowed_sequences(tiny):
    model, variables = tiny
    stop = 2
    # Shared prefixes (a trie with branches), different lengths, one row with a single choice.
    choices = [
        [[30, 31, 32, stop], [30, 31, stop], [40, stop], [30, 50, 51, stop]],
        [[60, stop], [61, 62, stop], [61, 63, 64, stop], [65, 66, 67, stop]],
        [[70, 71, stop]],
    ]
    rng = np.random.default_rng(3)
    for trial in range(4):
        prompts = [list(rng.integers(3, 97, n)) for n in (5, 8, 3)]
        tokens, mask = decode.left_pad(prompts, pad_id=0)
        allowed = np.full((3, 4, 8), -1, np.int32)
        for i, row in enumerate(choices):
            for j, seq in enumerate(row):
                allowed[i, j, :len(seq)] = seq
        out = decode.generate(
            model,
            variables,
            tokens,
            mask,
            max_new_tokens=8,
            stop_tokens=(stop, ),
            allowed=allowed,
            temperature=1.0 if trial else 0.0,  # Sampling explores other branches.
            rng=jax.random.key(trial),
        )
        for i, row in enumerate(choices):
            emitted = [int(t) for t in np.asarray(out.tokens[i, :int(out.lengths[i])])]
            assert emitted in row, (trial, i, emitted)


def test_constrained_greedy_picks_the_best_allowed_first_token(tiny):
    model, variables = tiny
    tokens, mask = decode.left_pad([[5, 6, 7, 8]], pad_id=0)
    first = np.asarray(
        decode.generate(model, variables, tokens, mask, max_new_tokens=1,
                        return_logits=True).logits)[0, 0]
    options = [10, 20, 30, 40]
    allowed = np.asarray([[[t, 2] for t in options]], np.int32)
    out = decode.generate(model, variables, tokens, mask, max_new_tokens=2, stop_tokens=(2, ),
                          allowed=allowed)
    assert int(out.tokens[0, 0]) == options[int(np.argmax(first[options]))]


def test_constrained_choice_follows_the_trie_by_logits():
    """Hand-computed: the highest-logit allowed token at each step, the lowest id on a tie,
    only among continuations that agree with what was emitted."""
    stop = 2
    continuations = np.asarray([
        [[5, 7, stop], [5, 6, stop], [4, stop, -1]],  # 5 (1.0 > 0.5), then 6 (0.9 > 0.2).
        [[9, stop, -1], [3, stop, -1], [8, stop, -1]],  # 9 and 3 tie: the lower id, 3.
        [[5, stop, -1], [5, 6, stop], [4, stop, -1]],  # After 5: 6 (0.3) beats the stop (0.1).
    ])
    logits = np.asarray([
        [[1.0, 0.2, 0.0], [1.0, 0.9, 0.0], [0.5, 0.0, 0.0]],
        [[0.7, 0.0, 0.0], [0.7, 0.0, 0.0], [0.1, 0.0, 0.0]],
        [[1.0, 0.1, 0.0], [1.0, 0.3, 0.0], [0.5, 0.0, 0.0]],
    ])
    chosen = decode.constrained_choice(continuations, continuations >= 0, logits)
    assert list(chosen) == [1, 1, 1]
    # The stop token wins when its logit is higher.
    logits[2, 0, 1] = 0.4
    assert decode.constrained_choice(continuations, continuations >= 0, logits)[2] == 0


@pytest.mark.parametrize("scan", [False, True])
def test_constrained_choice_equals_constrained_decoding(tiny, scan):
    """The answer read off one scoring pass is the one decoding token by token with `allowed`
    spells (a trie with branches, continuations of several lengths, a row with one choice)."""
    model, variables = _stacked(*tiny) if scan else tiny
    stop = 2
    choices = [
        [[30, 31, 32, stop], [30, 31, stop], [40, stop], [30, 50, 51, stop]],
        [[60, stop], [61, 62, stop], [61, 63, 64, stop], [65, 66, 67, stop]],
        [[70, 71, stop]],
    ]
    allowed = np.full((3, 4, 8), -1, np.int32)
    for i, row in enumerate(choices):
        for j, seq in enumerate(row):
            allowed[i, j, :len(seq)] = seq
    rng = np.random.default_rng(5)
    decoded_choices = set()
    for _ in range(6):
        prompts = [list(rng.integers(3, 97, n)) for n in (5, 8, 3)]
        tokens, mask = decode.left_pad(prompts, pad_id=0)
        decoded = decode.generate(model, variables, tokens, mask, max_new_tokens=8,
                                  stop_tokens=(stop, ), allowed=allowed)
        prefilled = decode.prefill(model, variables, tokens, mask, room=8)
        _, logits = decode.score_continuations(model, variables, prefilled, np.maximum(allowed, 0),
                                               allowed >= 0, token_logits=True)
        chosen = decode.constrained_choice(allowed, allowed >= 0, np.asarray(logits))
        for i in range(3):
            emitted = [int(t) for t in np.asarray(decoded.tokens[i, :int(decoded.lengths[i])])]
            assert choices[i][chosen[i]] == emitted
            decoded_choices.add((i, len(emitted)))
    assert len(decoded_choices) > 3  # The prompts led to different branches.


@pytest.mark.parametrize("scan", [False, True])
def test_continuation_scores_equal_full_forward_log_probs(tiny, scan):
    """Packed continuations (each reading the prompt and only its own earlier tokens) score
    what each continuation scores appended to its prompt alone."""
    model, variables = _stacked(*tiny) if scan else tiny
    prompts = [[5, 6, 7, 8, 9], [11, 12]]
    continuations = [[[20, 21, 2], [22, 2]], [[30, 2], [31, 32, 33, 2]]]
    tokens, mask = decode.left_pad(prompts, pad_id=0)
    steps = 4
    padded = np.zeros((2, 2, steps), np.int32)
    cmask = np.zeros((2, 2, steps), bool)
    for i, row in enumerate(continuations):
        for j, seq in enumerate(row):
            padded[i, j, :len(seq)] = seq
            cmask[i, j, :len(seq)] = True
    prefilled = decode.prefill(model, variables, tokens, mask, room=0)  # Scoring adds room.
    scores = np.asarray(decode.score_continuations(model, variables, prefilled, padded, cmask))
    for i, prompt in enumerate(prompts):
        for j, seq in enumerate(continuations[i]):
            full = np.asarray([prompt + seq], np.int32)
            logits = np.asarray(tiny[0].apply(tiny[1], full).logits[0], np.float64)
            log_probs = log_softmax(logits, axis=-1)
            expected = sum(log_probs[len(prompt) - 1 + k, token] for k, token in enumerate(seq))
            np.testing.assert_allclose(scores[i, j], expected, rtol=1e-4, atol=1e-4)


def _scripted_llama(successor, runner_up, vocab=32):
    """A one-layer Llama whose greedy next token is `successor[t]` after token t (logit 10),
    with `runner_up[t]` second (logit 5): one-hot embeddings, the layer's outputs zeroed (the
    residual stream is the embedding), lm_head the hand-written table."""
    config = llama.get_config(
        "tiny",
        vocab_size=vocab,
        hidden_size=vocab,
        intermediate_size=16,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        tie_word_embeddings=False,
    )
    model = llama.Llama(config)
    params = mesh_lib.init_sharded(model, jax.random.key(0), jnp.ones((1, 1), jnp.int32))["params"]
    params = jax.tree.map(np.array, params)  # Writable copies.
    params["layers_0"]["self_attn"]["o_proj"]["kernel"][:] = 0
    params["layers_0"]["mlp"]["down_proj"]["kernel"][:] = 0
    params["embed_tokens"]["embedding"][:] = np.eye(vocab)
    head = np.zeros((vocab, vocab), np.float32)
    for t in range(vocab):
        head[t, successor.get(t, 0)] += 10.0
        head[t, runner_up.get(t, 1)] += 5.0
    params["lm_head"]["kernel"][:] = head / np.sqrt(vocab)  # RMSNorm scales one-hots by √V.
    return model, {"params": jax.tree.map(jnp.asarray, params)}


def test_eos_is_never_the_first_new_token():
    eos, prompt_end = 2, 7
    model, variables = _scripted_llama({prompt_end: eos, 9: eos}, {prompt_end: 9})
    tokens, mask = decode.left_pad([[5, 6, prompt_end]], pad_id=0)
    free = decode.generate(model, variables, tokens, mask, max_new_tokens=4, stop_tokens=(eos, ))
    assert int(free.tokens[0, 0]) == eos and int(free.lengths[0]) == 1  # The model's choice...
    llara = decode.generate(model, variables, tokens, mask, max_new_tokens=4, stop_tokens=(eos, ),
                            min_new_tokens=1)
    # ... but at least one token comes first: the runner-up, then EOS is allowed again.
    assert [int(t) for t in llara.tokens[0, :2]] == [9, eos] and int(llara.lengths[0]) == 2


def _llara_first_line(texts):
    """LLaRA's reading of an answer: all 64 tokens, stripped, first line."""
    return "".join(texts).strip().split("\n")[0]


@pytest.mark.parametrize(
    "script, length",
    [
        (["\n", "Tita", "nic", "\n", "Avatar"], 4),  # A leading line break, then the title.
        (["\n", "\n", " ", "Tita", "nic", "\n"], 6),  # Several, and a space.
        (["Tita", "nic\n", "Avatar"], 2),  # The line ends inside a token.
        (["\nTita", "nic", "\nAvatar"], 3),  # A break before the text inside a token.
        ([" Tita", "nic"], 3),  # No line break: until EOS (or the token budget).
    ],
)
def test_an_answer_stops_where_llaras_first_line_ends(script, length):
    vocab, eos, prompt_end = 32, 2, 7
    ids = list(range(10, 10 + len(script)))
    texts = [""] * vocab
    for token, text in zip(ids, script):
        texts[token] = text
    successor = dict(zip([prompt_end] + ids, ids + [eos]))
    model, variables = _scripted_llama(successor, {})
    tokens, mask = decode.left_pad([[5, prompt_end]], pad_id=0)
    out = decode.generate(
        model,
        variables,
        tokens,
        mask,
        max_new_tokens=8,
        stop_tokens=(eos, ),
        min_new_tokens=1,
        line_classes=decode.token_line_classes(texts, vocab),
    )
    emitted = [int(t) for t in out.tokens[0, :int(out.lengths[0])]]
    assert emitted == (ids + [eos])[:length]
    # What we read equals what LLaRA reads from the whole generation.
    assert _llara_first_line(texts[t] for t in emitted) == _llara_first_line(script)


def test_token_line_classes():
    texts = ["a", "\n", "a\n", "\na", " ", " \n b", ""]
    c = decode.token_line_classes(texts, 9)
    H, N, T = decode.HAS_TEXT, decode.NEWLINE, decode.TEXT_THEN_NEWLINE
    assert list(c) == [H, N, H | N | T, H | N, 0, H | N, 0, 0, 0]


@pytest.mark.parametrize("scan", [False, True])
def test_queued_generation_equals_fixed_batches(tiny, scan, monkeypatch):
    """Slots refilled as rows end give every prompt the tokens `generate` gives it in a fixed
    batch, with fewer slots than prompts (refills), rows that end after a few tokens or only at
    max_new_tokens, and enough steps to move the cache left."""
    model, variables = tiny
    shifts = []
    shift_left = decode._shift_left
    monkeypatch.setattr(decode, "_shift_left",
                        lambda state, shift: shifts.append(int(shift)) or shift_left(state, shift))
    if scan:
        model, variables = _stacked(model, variables)
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(3, 97, n)) for n in (5, 12, 3, 9, 16, 7, 11, 4, 14)]
    steps = 10
    # Stop tokens: two frequent greedy choices, so rows end after different numbers of tokens.
    tokens, mask = decode.left_pad(prompts, pad_id=0)
    free = np.asarray(decode.generate(model, variables, tokens, mask, max_new_tokens=steps).tokens)
    values, counts = np.unique(free[:, 1:], return_counts=True)
    stop = tuple(int(t) for t in values[np.argsort(-counts)[:2]])
    fixed = decode.generate(model, variables, tokens, mask, max_new_tokens=steps, stop_tokens=stop,
                            min_new_tokens=1, pad_id=0)
    fixed_tokens, fixed_lengths = np.asarray(fixed.tokens), np.asarray(fixed.lengths)
    assert len(set(fixed_lengths.tolist())) >= 3, fixed_lengths  # Rows end at different steps.
    assert steps in fixed_lengths and min(fixed_lengths) < steps

    one_by_one = []
    for p in prompts:
        t, m = decode.left_pad([p], pad_id=0)
        one_by_one.append((t, m, None))
    answers, lengths = decode.generate_queued(model, variables, one_by_one, slots=3,
                                              max_new_tokens=steps, stop_tokens=stop,
                                              min_new_tokens=1, pad_id=0)
    np.testing.assert_array_equal(lengths, fixed_lengths)
    for row, answer in enumerate(answers):
        np.testing.assert_array_equal(answer, fixed_tokens[row, :fixed_lengths[row]])
    assert shifts and all(s > 0 for s in shifts)
    answers, lengths = decode.generate_queued(model, variables, [], slots=3, max_new_tokens=steps)
    assert answers == [] and lengths.shape == (0, )


@pytest.mark.parametrize("scan", [False, True])
def test_prompts_continuing_a_shared_prefix_equal_whole_prompts(tiny, scan):
    """A start run once and continued by each prompt's rest gives each whole prompt's next-token
    logits, continuation scores and queued greedy answers."""
    model, variables = _stacked(*tiny) if scan else tiny
    rng = np.random.default_rng(6)
    start = list(rng.integers(3, 97, 7))
    rests = [list(rng.integers(3, 97, n)) for n in (5, 1, 9, 3)]
    prefix = decode.prefill(model, variables, *decode.left_pad([start], pad_id=0), room=0)
    continuations = np.asarray([[[20, 21, 2], [22, 2, 0]]], np.int32)
    packed = decode.pack_continuations(continuations, np.asarray([[[1, 1, 1], [1, 1, 0]]], bool))
    whole, continued = [], []
    for rest in rests:
        tokens, mask = decode.left_pad([start + rest], pad_id=0)
        full = decode.prefill(model, variables, tokens, mask, room=0)
        tokens, mask = decode.left_pad([rest], pad_id=0)
        part = decode.prefill(model, variables, tokens, mask, room=0, prefix=prefix)
        np.testing.assert_allclose(part.logits, full.logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(part.next_position, full.next_position)
        np.testing.assert_allclose(
            decode.score_packed(model, variables, part, packed)[0],
            decode.score_packed(model, variables, full, packed)[0], rtol=1e-5, atol=1e-5)
        whole.append(decode.left_pad([start + rest], pad_id=0) + (None, ))
        continued.append((tokens, mask, None))
    kwargs = dict(slots=2, max_new_tokens=6, stop_tokens=(5, ), min_new_tokens=1)
    expected, expected_lengths = decode.generate_queued(model, variables, whole, **kwargs)
    answers, lengths = decode.generate_queued(model, variables, continued, prefix=prefix, **kwargs)
    np.testing.assert_array_equal(lengths, expected_lengths)
    for answer, reference in zip(answers, expected):
        np.testing.assert_array_equal(answer, reference)


def test_queued_generation_follows_the_line_rule_and_vocab_limit(tiny):
    model, variables = tiny
    rng = np.random.default_rng(4)
    prompts = [list(rng.integers(3, 97, n)) for n in (6, 10, 8, 3)]
    tokens, mask = decode.left_pad(prompts, pad_id=0)
    classes = np.zeros(97, np.int32)
    classes[:50] = decode.HAS_TEXT
    classes[50:60] = decode.NEWLINE | decode.TEXT_THEN_NEWLINE
    kwargs = dict(max_new_tokens=8, vocab_limit=90, line_classes=classes, min_new_tokens=1)
    fixed = decode.generate(model, variables, tokens, mask, **kwargs)
    queued = [(t[None], m[None], None) for t, m in zip(tokens, mask)]
    answers, lengths = decode.generate_queued(model, variables, queued, slots=2, **kwargs)
    np.testing.assert_array_equal(lengths, np.asarray(fixed.lengths))
    for row, answer in enumerate(answers):
        np.testing.assert_array_equal(answer, np.asarray(fixed.tokens)[row, :lengths[row]])
        assert (answer < 90).all()
