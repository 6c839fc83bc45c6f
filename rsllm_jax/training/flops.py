"""Model FLOPs of a LoRA train step, counted for what the step really computes, and MFU.

Per sequence of L real tokens through a Llama with N non-embedding (projection) parameters,
H query heads of size h, n_l layers:

  forward    2·N·L                        every projection (multiply-add = 2 FLOPs)
             2·n_l·H·h·L·(L+1)            causal attention: QKᵀ and AV over the t+1 keys of
                                          query t (4·H·h·(t+1) per layer), summed over t
             2·d·V per logit position     the output layer, only where logits are computed
                                          (the answer positions of the NIP loss)
             LoRA: 2·r·(in+out) per token and adapted projection
  backward   the frozen base needs activation gradients only, no weight gradients: 2·N·L and
             2·d·V per logit position; attention 2× its forward (dS, dQ, dK, dV); LoRA 2× its
             forward (gradients of both factors and of their input)
The target tower (tower T, no output layer) is counted the same way on its tokens. The projector
of behavioural tokens counts 3× its forward (forward, weight and input gradients) per projected
item. Embedding lookups, norms and element-wise work are not counted; remat recomputation is
not counted either (this is MFU, not hardware FLOPs utilisation). Padding is not counted: only
real tokens, real answer positions and real placeholders are (the compiled step does more).
"""

import numpy as np

# Dense bf16 peak FLOP/s per device (NVIDIA: SXM dense tensor-core figures, no sparsity; TPU:
# per chip). Matched in order against jax.devices()[0].device_kind, lower-cased.
PEAK_FLOPS = (
    ("h100 pcie", 756e12),
    ("h100", 989e12),
    ("h200", 989e12),
    ("a100", 312e12),
    ("v6 lite", 918e12),
    ("v6e", 918e12),
    ("v5 lite", 197e12),
    ("v5e", 197e12),
    ("v5p", 459e12),
    ("tpu v5", 459e12),
    ("v4", 275e12),
)


def peak_flops(device_kind):
    """Peak dense bf16 FLOP/s of one device of this kind; None when unknown (e.g. CPU)."""
    kind = device_kind.lower()
    for key, value in PEAK_FLOPS:
        if key in kind:
            return value
    return None


def base_params(config):
    """N: the projection parameters of the decoder layers (no embeddings, norms, head)."""
    d, h = config.hidden_size, config.head_dim
    attention = d * h * (2 * config.num_heads + 2 * config.num_kv_heads)
    mlp = 3 * d * config.intermediate_size
    return config.num_layers * (attention + mlp)


def lora_forward_per_token(config):
    """Forward FLOPs of the LoRA factors per token: 2·r·(in + out) per adapted projection."""
    if config.lora is None:
        return 0
    d, h, r = config.hidden_size, config.head_dim, config.lora.rank
    sizes = dict(q=(d, config.num_heads * h), k=(d, config.num_kv_heads * h),
                 v=(d, config.num_kv_heads * h), o=(config.num_heads * h, d),
                 gate=(d, config.intermediate_size), up=(d, config.intermediate_size),
                 down=(config.intermediate_size, d))
    per_layer = sum(2 * r * (sizes[t][0] + sizes[t][1]) for t in config.lora.targets)
    return config.num_layers * per_layer


def attention_forward(config, lengths):
    """Causal attention forward FLOPs for sequences of the given real lengths."""
    lengths = np.asarray(lengths, np.float64)
    return float(2 * config.num_layers * config.num_heads * config.head_dim * np.sum(lengths *
                                                                                     (lengths + 1)))


def tower_flops(config, lengths, num_logits=0):
    """Forward + backward FLOPs of one tower over sequences of `lengths` real tokens, with
    `num_logits` output-layer positions in total."""
    tokens = float(np.sum(lengths))
    n = base_params(config)
    head = 2 * config.hidden_size * config.vocab_size * float(num_logits)
    forward = 2 * n * tokens + attention_forward(config, lengths) + head \
        + lora_forward_per_token(config) * tokens
    backward = 2 * n * tokens + 2 * attention_forward(config, lengths) + head \
        + 2 * lora_forward_per_token(config) * tokens
    return forward + backward


def step_flops(config, lengths, num_logits, target_lengths=(), num_projected=0, item_dim=64):
    """FLOPs of one train step: user tower, target tower, projector."""
    d = config.hidden_size
    projector = 3 * 2 * (item_dim * d + d * d) * float(num_projected)
    return tower_flops(config, lengths, num_logits) + tower_flops(config, target_lengths) \
        + projector


def batch_flops(config, batch, with_target_tower=True, item_dim=64):
    """`step_flops` of a collated batch (host-local arrays): real tokens only."""
    target = np.asarray(batch["target_attention_mask"]).sum(axis=1) if with_target_tower else ()
    projected = np.asarray(batch["placeholder_mask"]).sum()
    if with_target_tower:
        projected += np.asarray(batch["target_placeholder_mask"]).sum()
    return step_flops(config,
                      np.asarray(batch["attention_mask"]).sum(axis=1),
                      np.asarray(batch["nip_mask"]).sum(), target, projected, item_dim)


def mfu(flops_per_second, device_kind, num_devices):
    """Model FLOPs utilisation in [0, 1], or None for a device kind without a known peak."""
    peak = peak_flops(device_kind)
    return None if peak is None else flops_per_second / (peak * num_devices)
