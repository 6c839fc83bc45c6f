"""Model definitions: the Llama decoder, LoRA adapters and KV-cache generation."""

from rsllm_jax.models.llama import (
    CONFIGS,
    KVCache,
    Llama,
    LlamaConfig,
    LlamaOutput,
    RopeScaling,
    get_config,
    init_cache,
    positions_from_mask,
)
from rsllm_jax.models.lora import LORA, LoraConfig, merge_lora
