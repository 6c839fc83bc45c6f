"""Llama 2/3 decoder in Flax Linen: GQA, RoPE (HF rotate-half layout), SwiGLU, LoRA.

Parameters live in `"params"` (frozen base) and, when `config.lora` is set, LoRA factors in
`"lora"`. Every parameter and the main activations carry logical axis names (`batch`,
`length`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `vocab`, plus `layers` for the
stacked axis under `scan_layers`); `rsllm_jax.parallel.mesh` maps them to a device mesh.
Submodule names follow Hugging Face's so that checkpoint conversion is a table of renames,
transposes and reshapes.
"""

import dataclasses
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rsllm_jax.models.lora import LoraConfig, Projection

ROPE_TYPES = ("default", "linear", "llama3")
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: `linear` (divide by factor) or Llama-3's piecewise rule."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"Unsupported rope scaling type {self.rope_type!r}; supported: {ROPE_TYPES}.")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture, numerics and layout of a Llama model (HF field meanings)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 0  # 0: hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    # Numerics and layout.
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype
    scan_layers: bool = False
    remat_policy: str = "none"
    # jax.nn.dot_product_attention's implementation for whole sequences (training, scoring
    # without a cache); reading a KV cache is always `cached_attention`.
    attention_impl: str | None = None
    lora: LoraConfig | None = None

    def __post_init__(self):
        if not self.head_dim:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads "
                                 f"{self.num_heads}.")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}."
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}.")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"Unknown remat_policy {self.remat_policy!r}; choose from {list(REMAT_POLICIES)}.")
        for field in ("param_dtype", "dtype"):
            if getattr(self, field) not in ("float32", "bfloat16", "float16"):
                raise ValueError(
                    f"{field} must be float32, bfloat16 or float16, got {getattr(self, field)!r}.")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    def replace(self, **changes) -> "LlamaConfig":
        # A derived head_dim follows hidden_size/num_heads changes; an explicit one stays.
        derived = self.head_dim == self.hidden_size // self.num_heads
        if derived and "head_dim" not in changes and {"hidden_size", "num_heads"} & set(changes):
            changes["head_dim"] = 0
        return dataclasses.replace(self, **changes)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.eos_token_id
        return () if eos is None else (eos, ) if isinstance(eos, int) else tuple(eos)


CONFIGS = {
    # Random-init sizes for demos and tests: no download needed.
    "tiny": LlamaConfig(
        vocab_size=1024,
        hidden_size=128,
        intermediate_size=344,
        num_layers=2,
        # Grouped-query attention that every 8-device mesh preset can split (tensor=4).
        num_heads=8,
        num_kv_heads=4,
        max_position_embeddings=2048,
        # ≈ 1/sqrt(hidden_size). At 0.02 the tied embedding rows have norm 0.23 against a final
        # RMSNorm output of norm ≈ sqrt(128), so no logit can exceed ≈ 2.6 and the frozen head
        # cannot put much probability on any token of a 1,000-token vocabulary.
        initializer_range=0.088,
        tie_word_embeddings=True,
        eos_token_id=2,
        pad_token_id=0,
    ),
    "bench": LlamaConfig(
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=688,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
    ),
    # SmolLM2-135M's shapes (the GGUF of README, Data), for benchmarks with random weights.
    "smollm2_135m": LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    ),
    "llama2_7b": LlamaConfig(),
    "llama3_8b": LlamaConfig(
        vocab_size=128256,
        intermediate_size=14336,
        num_kv_heads=8,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
}


def get_config(name: str, **overrides) -> LlamaConfig:
    """A named preset (`tiny`, `bench`, `llama2_7b`, `llama3_8b`) with field overrides."""
    if name not in CONFIGS:
        raise ValueError(f"Unknown model preset {name!r}; known: {sorted(CONFIGS)}.")
    return CONFIGS[name].replace(**overrides)


class KVCache(NamedTuple):
    """Keys and values of every layer, key validity, write slot.

    `k` and `v` are (layers, batch, kv_heads, max_length, head_dim) arrays under
    `scan_layers`, else tuples of one (batch, kv_heads, max_length, head_dim) array per layer:
    each layer then writes its new keys into its own buffer in place, where slicing one
    stacked array and stacking the layers again would copy the whole cache per decoded token.
    Heads before slots is the layout attention reads (`cached_attention`): with slots before
    heads, every decoding step transposed each layer's whole cache.
    """

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    valid: jax.Array  # (batch, max_length) bool: slot holds a real (non-padding) token
    index: jax.Array  # () int32: next slot to write


def init_cache(config: LlamaConfig, batch: int, max_length: int) -> KVCache:
    shape = (batch, config.num_kv_heads, max_length, config.head_dim)

    def zeros():
        if config.scan_layers:
            return jnp.zeros((config.num_layers, *shape), config.dtype)
        return tuple(jnp.zeros(shape, config.dtype) for _ in range(config.num_layers))

    return KVCache(
        k=zeros(),
        v=zeros(),
        valid=jnp.zeros((batch, max_length), bool),
        index=jnp.zeros((), jnp.int32),
    )


class LlamaOutput(NamedTuple):
    logits: jax.Array | None  # float32, (batch, length or len(logits_at), vocab)
    hidden_states: jax.Array  # final-norm hidden states (batch, length, embed)
    cache: KVCache | None


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids for left- (or right-) padded rows: 0 at each row's first real token."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Inverse frequencies (head_dim/2,), float32, as Hugging Face computes them."""
    dim = config.head_dim
    inv_freq = (1.0 / (np.float32(config.rope_theta)
                       **(np.arange(0, dim, 2, dtype=np.float32) / dim))).astype(np.float32)
    s = config.rope_scaling
    if s is None or s.rope_type == "default":
        return inv_freq
    if s.rope_type == "linear":
        return (inv_freq / s.factor).astype(np.float32)
    # Llama 3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen -
              s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(config: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin of shape (batch, length, head_dim), rotate-half layout, float32."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(config))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates (batch, length, heads, head_dim) by the position tables (HF rotate_half)."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


def _constrain(x, axes):
    return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("embed", )),
            (x.shape[-1], ),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * normed.astype(self.dtype)


def _projection(config: LlamaConfig, target: str, deterministic: bool, **kwargs) -> Projection:
    lora = config.lora if config.lora is not None and target in config.lora.targets else None
    return Projection(
        lora=lora,
        deterministic=deterministic,
        dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.dtype(config.param_dtype),
        kernel_init=nn.initializers.normal(config.initializer_range),
        name=f"{target}_proj",
        **kwargs,
    )


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                     scale: float) -> jax.Array:
    """Grouped-query attention of queries (batch, q_len, heads, head_dim) over a layer's
    cache k, v (batch, kv_heads, slots, head_dim) under `mask` (batch, 1, q_len, slots).

    `jax.nn.dot_product_attention`'s XLA computation (float32 logits, scaled, masked with a
    large negative number, float32 softmax) as two batched matrix products over
    (batch, kv_heads) with the queries of each kv head's group as rows, so neither the cache
    nor the probabilities are transposed: on (batch, slots, kv_heads, head_dim) keys, XLA
    copied every layer's whole cache for each decoded token (README, Performance).
    """
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    rows = q.reshape(batch, length, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    rows = rows.reshape(batch, kv_heads, group * length, head_dim)
    batch_dims = ((0, 1), (0, 1))
    logits = jax.lax.dot_general(rows, k, (((3, ), (3, )), batch_dims),
                                 preferred_element_type=jnp.promote_types(q.dtype, jnp.float32))
    logits = logits.reshape(batch, kv_heads, group, length, -1) * jnp.asarray(scale, logits.dtype)
    logits = jnp.where(mask[:, :, None], logits, -0.7 * jnp.finfo(logits.dtype).max)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    probs = probs.reshape(batch, kv_heads, group * length, -1)
    out = jax.lax.dot_general(probs, v, (((3, ), (2, )), batch_dims))
    out = out.reshape(batch, kv_heads, group, length, head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, length, heads, head_dim)


class Attention(nn.Module):
    config: LlamaConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, rope, mask, cache_index=None, cache_kv=None):
        c = self.config
        proj = lambda target, **kw: _projection(c, target, self.deterministic, **kw)  # noqa: E731
        q = proj("q", features=(c.num_heads, c.head_dim), axes=("embed", "heads", "head_dim"))(x)
        k = proj("k", features=(c.num_kv_heads, c.head_dim),
                 axes=("embed", "kv_heads", "head_dim"))(x)
        v = proj("v", features=(c.num_kv_heads, c.head_dim),
                 axes=("embed", "kv_heads", "head_dim"))(x)
        q = _constrain(apply_rope(q, *rope), ("batch", "length", "heads", "head_dim"))
        k = _constrain(apply_rope(k, *rope), ("batch", "length", "kv_heads", "head_dim"))
        v = _constrain(v, ("batch", "length", "kv_heads", "head_dim"))
        new_kv = None
        if cache_kv is None:
            # Grouped-query attention: dot_product_attention broadcasts kv_heads over heads.
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=c.head_dim**-0.5,
                                               implementation=c.attention_impl)
        else:
            k_cache, v_cache = cache_kv
            write = lambda buffer, new: jax.lax.dynamic_update_slice(  # noqa: E731
                buffer,
                new.transpose(0, 2, 1, 3).astype(buffer.dtype), (0, 0, cache_index, 0))
            new_kv = k, v = write(k_cache, k), write(v_cache, v)
            out = cached_attention(q.astype(k.dtype), k, v, mask, c.head_dim**-0.5)
        out = _constrain(out, ("batch", "length", "heads", "head_dim"))
        out = proj("o", features=(c.hidden_size, ), axes=("heads", "head_dim", "embed"),
                   in_dims=2)(out)
        return out, new_kv


class MLP(nn.Module):
    config: LlamaConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        c = self.config
        proj = lambda target, **kw: _projection(c, target, self.deterministic, **kw)  # noqa: E731
        gate = proj("gate", features=(c.intermediate_size, ), axes=("embed", "mlp"))(x)
        up = proj("up", features=(c.intermediate_size, ), axes=("embed", "mlp"))(x)
        h = _constrain(nn.silu(gate) * up, ("batch", "length", "mlp"))
        return proj("down", features=(c.hidden_size, ), axes=("mlp", "embed"))(h)


class DecoderLayer(nn.Module):
    config: LlamaConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, rope, mask, cache_index=None, cache_kv=None):
        c = self.config
        norm = lambda name: RMSNorm(  # noqa: E731
            c.rms_norm_eps, jnp.dtype(c.dtype), jnp.dtype(c.param_dtype), name=name)
        h, new_kv = Attention(c, self.deterministic,
                              name="self_attn")(norm("input_layernorm")(x), rope, mask, cache_index,
                                                cache_kv)
        x = x + h
        x = x + MLP(c, self.deterministic, name="mlp")(norm("post_attention_layernorm")(x))
        return _constrain(x, ("batch", "length", "embed")), new_kv


class Llama(nn.Module):
    """Llama causal LM.

    `deterministic=False` enables LoRA dropout (needs a `"dropout"` rng).
    """

    config: LlamaConfig
    deterministic: bool = True

    def setup(self):
        c = self.config
        dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        self.embed_tokens = nn.Embed(
            c.vocab_size,
            c.hidden_size,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(c.initializer_range),
                                                        ("vocab", "embed")),
            dtype=dtype,
            param_dtype=param_dtype,
        )
        layer = DecoderLayer
        policy = REMAT_POLICIES[c.remat_policy]
        if c.remat_policy != "none":
            layer = nn.remat(layer, policy=policy, prevent_cse=not c.scan_layers)
        if c.scan_layers:
            self.layers = nn.scan(
                layer,
                variable_axes={"params": 0, "lora": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
                length=c.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(c, self.deterministic)
        else:
            self.layers = [layer(c, self.deterministic) for _ in range(c.num_layers)]
        self.norm = RMSNorm(c.rms_norm_eps, dtype, param_dtype)
        if not c.tie_word_embeddings:
            self.lm_head = Projection(
                features=(c.vocab_size, ),
                axes=("embed", "vocab"),
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=nn.initializers.normal(c.initializer_range),
            )

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Token embeddings (batch, length, embed) in the compute dtype."""
        return _constrain(self.embed_tokens(tokens), ("batch", "length", "embed"))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Output-layer logits (float32) for final-norm hidden states (..., embed)."""
        if self.config.tie_word_embeddings:
            logits = self.embed_tokens.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        return logits.astype(jnp.float32)

    def __call__(
        self,
        tokens: jax.Array | None = None,
        *,
        embeddings: jax.Array | None = None,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        logits_at: jax.Array | None = None,
        compute_logits: bool = True,
        cache: KVCache | None = None,
        segment_ids: jax.Array | None = None,
    ) -> LlamaOutput:
        """Runs the decoder.

        Args:
          tokens: (batch, length) token ids; or give `embeddings` (batch, length, embed) instead.
          positions: (batch, length) RoPE position ids; default: from `attention_mask`
            (exact for left-padded rows), or consecutive from the cache's write slot.
          attention_mask: (batch, length), 1 for real tokens and 0 for padding.
          logits_at: (batch, n) int positions where logits are wanted; None: every position.
          compute_logits: False skips the output layer (only hidden states are returned).
          cache: a `KVCache`; the new keys/values are written at `cache.index` and the
            updated cache is returned (incremental decoding).
          segment_ids: (batch, length) with `cache`: the tokens are several sequences packed
            one after another, each continuing the cached prompt; a token attends to the
            cache's earlier slots and to the earlier tokens of its own segment only.
        """
        c = self.config
        if (tokens is None) == (embeddings is None):
            raise ValueError("Pass exactly one of `tokens` and `embeddings`.")
        x = self.embed(tokens) if embeddings is None else embeddings.astype(jnp.dtype(c.dtype))
        x = _constrain(x, ("batch", "length", "embed"))
        batch, length = x.shape[:2]
        if attention_mask is None:
            attention_mask = jnp.ones((batch, length), bool)
        attention_mask = attention_mask.astype(bool)

        if cache is None:
            start = 0
            valid = attention_mask
            kv_slots = jnp.arange(length)
        else:
            start = cache.index
            valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, start))
            kv_slots = jnp.arange(cache.valid.shape[1])
        if positions is None:
            positions = positions_from_mask(attention_mask) + (0 if cache is None else start)
        q_slots = start + jnp.arange(length)
        # Causal over cache slots, padding keys masked; the diagonal keeps padded query rows finite.
        causal = kv_slots[None, :] <= q_slots[:, None]
        mask = (causal[None] & valid[:, None, :]) | (kv_slots[None, :] == q_slots[:, None])[None]
        if segment_ids is not None:
            if cache is None:
                raise ValueError("segment_ids packs continuations of a cached prompt: pass cache")
            segment_ids = segment_ids.astype(jnp.int32)
            slot_segments = jax.lax.dynamic_update_slice(jnp.full(valid.shape, -1, jnp.int32),
                                                         segment_ids, (0, start))
            mask &= (kv_slots < start)[None, None] | (slot_segments[:, None, :]
                                                      == segment_ids[:, :, None])
        mask = mask[:, None]  # (batch, 1, q, kv), broadcast over heads
        rope = rope_tables(c, positions)

        new_cache = None
        if c.scan_layers:
            kv = None if cache is None else (cache.k, cache.v)
            x, new_kv = self.layers(x, rope, mask, start, kv)
            if cache is not None:
                new_cache = KVCache(new_kv[0], new_kv[1], valid, start + length)
        else:
            new_k, new_v = [], []
            for i, layer in enumerate(self.layers):
                kv = None if cache is None else (cache.k[i], cache.v[i])
                x, layer_kv = layer(x, rope, mask, start, kv)
                if cache is not None:
                    new_k.append(layer_kv[0])
                    new_v.append(layer_kv[1])
            if cache is not None:
                new_cache = KVCache(tuple(new_k), tuple(new_v), valid, start + length)

        hidden = self.norm(x)
        logits = None
        if compute_logits:
            selected = hidden
            if logits_at is not None:
                selected = jnp.take_along_axis(hidden, logits_at[..., None].astype(jnp.int32),
                                               axis=1)
            logits = _constrain(self.logits(selected), ("batch", "length", "vocab"))
        return LlamaOutput(logits, hidden, new_cache)
