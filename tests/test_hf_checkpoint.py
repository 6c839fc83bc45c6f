"""Export round trips through transformers and peft, sharded safetensors, and clear load errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from hf_reference import hf_config, hf_logits
from rsllm_jax.checkpoint import hf as hf_ckpt
from rsllm_jax.models import llama, lora as lora_lib
from rsllm_jax.parallel import mesh as mesh_lib

TOL = 1e-4
LORA = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "o", "gate", "down"))


def _random_lora(lora, seed):
    """Non-zero B factors so that the adapters change the output."""
    leaves, treedef = jax.tree_util.tree_flatten(lora)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [0.2 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


@pytest.fixture(scope="module")
def ours():
    config = hf_ckpt.config_from_hf(
        hf_config(tie=False, llama3=True).to_dict(), initializer_range=0.2, lora=LORA)
    model = llama.Llama(config)
    variables = mesh_lib.init_sharded(model, jax.random.key(0), jnp.ones((1, 1), jnp.int32))
    return config, variables["params"], _random_lora(variables["lora"], 1)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=g-import-not-at-top

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i + 3 for i in range(50)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                                bos_token="<s>", eos_token="</s>")


def test_export_round_trip_and_lora_parity(ours, tmp_path):
    config, params, lora = ours
    model = llama.Llama(config)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 9)).astype(np.int32)
    forward = jax.jit(lambda v: model.apply(v, tokens).logits)

    # Base weights: zero LoRA equals no LoRA; the export loads in transformers with the same logits.
    zero = jax.tree_util.tree_map(jnp.zeros_like, lora)
    base = np.asarray(forward({"params": params, "lora": zero}))
    hf_ckpt.save_hf(str(tmp_path / "base"), config, params, tokenizer=_tokenizer())
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"),
                                                                  attn_implementation="eager")
    np.testing.assert_allclose(base, hf_logits(reference, tokens), atol=TOL, rtol=0)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "base"))
    assert tok("w1 w7")["input_ids"] == [4, 10]

    # LoRA: ours = ours merged = transformers on the merged export = peft on the adapter export.
    with_lora = np.asarray(forward({"params": params, "lora": lora}))
    assert np.abs(with_lora - base).max() > 1e-2
    merged = lora_lib.merge_lora(params, lora, config.lora)
    np.testing.assert_allclose(np.asarray(forward({"params": merged, "lora": zero})), with_lora,
                               atol=TOL, rtol=0)
    hf_ckpt.save_hf(str(tmp_path / "merged"), config, params, lora)
    merged_ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"),
                                                                   attn_implementation="eager")
    np.testing.assert_allclose(with_lora, hf_logits(merged_ref, tokens), atol=TOL, rtol=0)

    import peft  # pylint: disable=g-import-not-at-top

    hf_ckpt.save_peft_adapter(str(tmp_path / "adapter"), config, lora)
    peft_model = peft.PeftModel.from_pretrained(reference, str(tmp_path / "adapter")).eval()
    np.testing.assert_allclose(with_lora, hf_logits(peft_model, tokens), atol=TOL, rtol=0)


def test_sharded_export_bf16_and_reimport(ours, tmp_path):
    config, params, _ = ours
    path = str(tmp_path / "sharded")
    hf_ckpt.save_hf(path, config, params, dtype="bfloat16", max_shard_bytes=60_000)
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    with open(os.path.join(path, hf_ckpt.SAFE_INDEX)) as f:
        index = json.load(f)
    assert set(index["weight_map"].values()) == set(files)
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f).get("dtype", "bfloat16") == "bfloat16"
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    back_config, back = hf_ckpt.load_hf(path, scan_layers=True)
    assert back_config.rope_scaling == config.rope_scaling
    q = back["layers"]["self_attn"]["q_proj"]["kernel"][1]
    expected = np.asarray(params["layers_1"]["self_attn"]["q_proj"]["kernel"].astype(
        jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_array_equal(q, expected)
    hf_q = reference.model.layers[1].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_array_equal(hf_q, expected.reshape(config.hidden_size, -1).T)


def test_config_formats_agree():
    v5 = hf_config(llama3=True).to_dict()
    v4 = {k: v for k, v in v5.items() if k not in ("rope_parameters", "dtype")}
    rope = dict(v5["rope_parameters"])
    v4.update(rope_theta=rope.pop("rope_theta"), torch_dtype="bfloat16")
    v4["rope_scaling"] = {("type" if k == "rope_type" else k): v for k, v in rope.items()}
    assert hf_ckpt.config_from_hf(v4) == hf_ckpt.config_from_hf(v5)
    assert hf_ckpt.config_from_hf(v5).rope_scaling.rope_type == "llama3"


def test_load_errors(ours, tmp_path):
    config, params, _ = ours
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf_ckpt.load_hf(str(tmp_path))
    path = str(tmp_path / "m")
    hf_ckpt.save_hf(path, config, params)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*shape"):
        hf_ckpt.load_hf(path, intermediate_size=64)
    tensors = {
        k: np.asarray(v)
        for k, v in hf_ckpt.open_hf_weights(path).items() if "layers.1.mlp.up_proj" not in k
    }
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        hf_ckpt.params_from_tensors(config, tensors)
    os.remove(os.path.join(path, hf_ckpt.SAFE_WEIGHTS))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        hf_ckpt.load_hf(path)
