"""MFU accounting: the LoRA step's FLOPs against a hand count, and the peak-FLOP/s table."""

import numpy as np
import pytest

from rsllm_jax.models import llama, lora
from rsllm_jax.training import flops

# d 8, 2 query heads and 1 KV head of size 4, MLP 16, one layer, vocab 10, LoRA r 2 on q and v.
CONFIG = llama.get_config("tiny", vocab_size=10, hidden_size=8, intermediate_size=16, num_layers=1,
                          num_heads=2, num_kv_heads=1,
                          lora=lora.LoraConfig(rank=2, targets=("q", "v")))


def _hand_tower(length, logits):
    """Forward + backward of one sequence, matrix by matrix."""
    d, hd, inter, vocab, r = 8, 4, 16, 10, 2
    shapes = [(d, 2 * hd), (d, hd), (d, hd), (2 * hd, d), (d, inter), (d, inter), (inter, d)]
    projections = sum(2 * i * o for i, o in shapes) * length  # 2 FLOPs per multiply-add.
    # Query t attends t + 1 keys: QKᵀ and AV, 2 heads of size 4.
    attention = sum(2 * 2 * (2 * hd) * (t + 1) for t in range(length))
    head = 2 * d * vocab * logits
    adapters = (2 * (d * r + r * 2 * hd) + 2 * (d * r + r * hd)) * length  # q, v: x@a, h@b.
    forward = projections + attention + head + adapters
    # Frozen weights: input gradients only; attention and LoRA: two matmuls per forward one.
    backward = projections + 2 * attention + head + 2 * adapters
    return forward + backward


def test_step_flops_match_a_hand_count():
    assert flops.base_params(CONFIG) == 8 * 8 + 8 * 4 * 2 + 8 * 8 + 3 * 8 * 16
    assert flops.tower_flops(CONFIG, [3], 2) == _hand_tower(3, 2) == 9136
    # Two prompts (3 and 5 real tokens, 2 + 1 logit positions), their target items (2 and 1
    # tokens) through the target tower, 3 projected items (64 → 8 → 8, 3× forward).
    projector = 3 * 2 * (64 * 8 + 8 * 8) * 3
    expected = (_hand_tower(3, 2) + _hand_tower(5, 1) + _hand_tower(2, 0) + _hand_tower(1, 0) +
                projector)
    assert flops.step_flops(CONFIG, [3, 5], 3, [2, 1], 3, item_dim=64) == expected
    # The same count from a collated batch: padding is not counted.
    batch = dict(attention_mask=np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]],
                                         bool), nip_mask=np.array([[1, 1], [1, 0]], bool),
                 target_attention_mask=np.array([[1, 1, 0], [1, 0, 0]], bool),
                 placeholder_mask=np.array([[0, 1, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0]],
                                           bool), target_placeholder_mask=np.zeros((2, 3), bool))
    assert flops.batch_flops(CONFIG, batch, True, item_dim=64) == expected
    without = flops.batch_flops(CONFIG, batch, False, item_dim=64)
    assert without == _hand_tower(3, 2) + _hand_tower(5, 1) + projector


def test_a_7b_lora_step_is_about_4n_per_token():
    """Llama-2-7B: N ≈ 6.5e9, so forward + input gradients ≈ 4N per token, plus attention."""
    config = llama.get_config("llama2_7b", lora=lora.LoraConfig(rank=8))
    n = flops.base_params(config)
    assert n == pytest.approx(6.48e9, rel=0.01)
    per_token = flops.tower_flops(config, [512], 0) / 512
    assert 4 * n < per_token < 4.3 * n


@pytest.mark.parametrize("kind, peak", [("NVIDIA H100 80GB HBM3", 989e12),
                                        ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
                                        ("NVIDIA A100-SXM4-80GB", 312e12), ("TPU v4", 275e12),
                                        ("TPU v5 lite", 197e12), ("TPU v5p", 459e12),
                                        ("TPU v6 lite", 918e12), ("cpu", None)])
def test_peak_flops_by_device_kind(kind, peak):
    assert flops.peak_flops(kind) == peak


def test_mfu():
    assert flops.mfu(989e12 * 4, "NVIDIA H100 80GB HBM3", 8) == pytest.approx(0.5)
    assert flops.mfu(1e12, "cpu", 1) is None
