"""Shared helpers: tiny random Llama configs and transformers reference models (tests only)."""

import numpy as np
import torch
import transformers

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
LLAMA3_ROPE = dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=64,
)


def hf_config(tie=False, llama3=False, **overrides) -> transformers.LlamaConfig:
    kwargs = dict(TINY, tie_word_embeddings=tie, **overrides)
    rope = (dict(LLAMA3_ROPE, rope_theta=500000.0) if llama3 else dict(
        rope_type="default", rope_theta=10000.0))
    kwargs["rope_parameters"] = rope
    return transformers.LlamaConfig(**kwargs)


def random_hf_model(config, seed=0) -> transformers.LlamaForCausalLM:
    """A float32 eager-attention Llama with weights large enough that errors are visible."""
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    return model


def hf_logits(model, tokens, mask=None, positions=None) -> np.ndarray:
    tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    kwargs = {}
    if mask is not None:
        kwargs["attention_mask"] = torch.as_tensor(np.asarray(mask), dtype=torch.long)
    if positions is not None:
        kwargs["position_ids"] = torch.as_tensor(np.asarray(positions), dtype=torch.long)
    with torch.no_grad():
        return model(input_ids=tokens, **kwargs).logits.float().numpy()


def left_padded_batch(rng: np.random.Generator, lengths, total, vocab, pad_id=0):
    """Random token rows left-padded to `total`; returns tokens, mask, positions."""
    tokens = np.full((len(lengths), total), pad_id, np.int32)
    mask = np.zeros((len(lengths), total), np.int32)
    for i, n in enumerate(lengths):
        tokens[i, total - n:] = rng.integers(3, vocab, n)
        mask[i, total - n:] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return tokens, mask, positions
