"""RSLLM around the Llama: behavioural-token injection, new token rows, the two towers.

Variables live in three collections:
  "params"   the frozen base Llama (re-read from the base checkpoint, never saved by training)
  "lora"     the LoRA factors of the Llama
  "adapter"  the projector (paper §4.1.2: Proj, a 2-layer perceptron 64 → d → d with GELU)
             and the embedding rows of the tokens added to the vocabulary ([DSR], [IID…],
             placeholders)
so what training updates is {"lora", "adapter"}: collections, not a naming convention.

Injection keeps shapes static and the (batch, length, embed) sharding: token ids at or above
the base vocabulary read the new rows, and at placeholder positions the k-th placeholder of a
row (cumulative sum of the mask) takes the k-th projected item embedding (Eq. 1).
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rsllm_jax.models.llama import Llama, LlamaConfig

ADAPTER = "adapter"
TRAINABLE = ("lora", ADAPTER)


def _adapter_param(module, name, init, shape, axes, dtype):
    """A parameter in the "adapter" collection, with logical axis names for sharding."""
    boxed = nn.with_logical_partitioning(init, axes)
    return module.variable(ADAPTER, name,
                           lambda: boxed(module.make_rng("params"), shape, dtype)).value


def torch_linear_init(fan_in):
    """PyTorch's default nn.Linear init for weights and biases alike: uniform on
    ±1/sqrt(fan_in) (LLaRA's projector is two nn.Linear layers)."""
    bound = fan_in**-0.5
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


class Projector(nn.Module):
    """Proj(e) = W2 · GELU(W1 · e + b1) + b2 (paper §4.1.2), in the adapter collection.

    As LLaRA's MlpProjector: exact (erf) GELU, PyTorch's default Linear init.
    """

    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, e):
        d_in = e.shape[-1]
        w1 = _adapter_param(self, "w1", torch_linear_init(d_in), (d_in, self.features),
                            (None, "embed"), self.param_dtype)
        b1 = _adapter_param(self, "b1", torch_linear_init(d_in), (self.features, ), ("embed", ),
                            self.param_dtype)
        w2 = _adapter_param(self, "w2", torch_linear_init(self.features),
                            (self.features, self.features), ("embed", None), self.param_dtype)
        b2 = _adapter_param(self, "b2", torch_linear_init(self.features), (self.features, ),
                            (None, ), self.param_dtype)
        h = nn.gelu(
            e.astype(self.dtype) @ w1.astype(self.dtype) + b1.astype(self.dtype), approximate=False)
        return h @ w2.astype(self.dtype) + b2.astype(self.dtype)


def masked_mean(hidden, mask):
    """Mean of hidden (B, S, d) over positions where mask (B, S) is true, in float32."""
    mask = mask.astype(jnp.float32)[..., None]
    total = (hidden.astype(jnp.float32) * mask).sum(axis=1)
    return total / jnp.maximum(mask.sum(axis=1), 1.0)


class RSLLM(nn.Module):
    """The Llama with behavioural tokens and the two towers of paper §4.2.

    Attributes:
      config: the Llama's config.
      num_new_tokens: tokens added to the vocabulary after the base ones.
      first_new_token: the id of the first added token (the base tokenizer's length, which
        can be below config.vocab_size when the embedding table is padded); default
        config.vocab_size.
      deterministic: False enables LoRA dropout (needs a "dropout" rng).
    """

    config: LlamaConfig
    num_new_tokens: int
    first_new_token: int | None = None
    deterministic: bool = True

    def setup(self):
        c = self.config
        self.llm = Llama(c, self.deterministic)
        # Trained parameters stay float32 whatever the frozen base's storage dtype.
        self.projector = Projector(c.hidden_size, jnp.dtype(c.dtype), jnp.float32)
        self.new_token_embedding = _adapter_param(self, "new_token_embedding",
                                                  nn.initializers.normal(c.initializer_range),
                                                  (max(self.num_new_tokens, 1), c.hidden_size),
                                                  (None, "embed"), jnp.float32)

    def embed_inputs(self, tokens, placeholder_mask, placeholder_items, item_table):
        """Input embeddings (B, S, d): base rows, new-token rows, projected item embeddings.

        `item_table` (num_items + 1, 64) is the recommender's frozen item-embedding table;
        `placeholder_items` (B, P) holds the item of each row's k-th placeholder.
        """
        chex.assert_rank([tokens, placeholder_mask, placeholder_items, item_table], 2)
        chex.assert_equal_shape([tokens, placeholder_mask])
        chex.assert_equal_shape_prefix([tokens, placeholder_items], 1)
        first_new = self.config.vocab_size if self.first_new_token is None else \
            self.first_new_token
        is_new = tokens >= first_new
        base = self.llm.embed(jnp.where(is_new, 0, tokens))
        rows = self.new_token_embedding
        new = jnp.take(rows, jnp.clip(tokens - first_new, 0, rows.shape[0] - 1), axis=0)
        x = jnp.where(is_new[..., None], new.astype(base.dtype), base)
        projected = self.projector(jnp.take(item_table, placeholder_items, axis=0))  # (B, P, d)
        slot = jnp.maximum(jnp.cumsum(placeholder_mask.astype(jnp.int32), axis=1) - 1, 0)
        injected = jnp.take_along_axis(projected, slot[..., None], axis=1)
        x = jnp.where(placeholder_mask[..., None], injected.astype(x.dtype), x)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))

    def user_tower(self, batch, item_table):
        """Tower U on the whole prompt: NIP logits at the answer positions only (Eq. 2), and
        g_U (history items) and g_UI (target title) by masked mean pooling."""
        x = self.embed_inputs(batch["tokens"], batch["placeholder_mask"],
                              batch["placeholder_items"], item_table)
        out = self.llm(embeddings=x, attention_mask=batch["attention_mask"],
                       logits_at=batch["nip_positions"])
        return (out.logits, masked_mean(out.hidden_states, batch["history_mask"]),
                masked_mean(out.hidden_states, batch["answer_mask"]))

    def target_tower(self, batch, item_table):
        """Tower T on the target item alone: g_I, mean-pooled over the item's tokens."""
        x = self.embed_inputs(batch["target_tokens"], batch["target_placeholder_mask"],
                              batch["target_placeholder_items"], item_table)
        out = self.llm(embeddings=x, attention_mask=batch["target_attention_mask"],
                       compute_logits=False)
        return masked_mean(out.hidden_states, batch["target_pool_mask"])

    def __call__(self, batch, item_table, with_target_tower=True):
        """dict(nip_logits (B, A, V), g_user, g_user_item, g_item) for a collated batch."""
        nip_logits, g_user, g_user_item = self.user_tower(batch, item_table)
        outputs = dict(nip_logits=nip_logits, g_user=g_user, g_user_item=g_user_item)
        if with_target_tower:
            outputs["g_item"] = self.target_tower(batch, item_table)
        return outputs


def split_variables(variables):
    """(frozen, trainable): the base "params" vs the {"lora", "adapter"} collections."""
    frozen = {k: v for k, v in variables.items() if k not in TRAINABLE}
    trainable = {k: v for k, v in variables.items() if k in TRAINABLE}
    return frozen, trainable


def graft_llama_params(variables, llama_params):
    """Puts a loaded base Llama's params (e.g. from `checkpoint.hf.load_hf`) under "llm"."""
    params = dict(variables.get("params", {}))
    params["llm"] = llama_params
    return dict(variables, params=params)


def preload_iid_embeddings(trainable, item_table, iid_rows, embed_table, llama_config):
    """Sets new-token rows `iid_rows[n]` (of [IID<n>]) to Proj(e_n), paper §4.1.1 "pre-loading
    item embeddings", with the freshly initialised projector and the recommender table's rows.

    A random projector maps the recommender's rows to vectors whose norm has nothing to do with
    the LLM's token embeddings (tens of times larger for a Llama whose rows have std ~0.02), so
    the projected rows are rescaled by one common factor to the mean row norm of the base
    embedding table `embed_table` (its real-token rows): the directions, and so the items'
    relative geometry, are Proj's; the scale is that of the tokens around them. Stage 2's
    behavioural tokens are Proj(e) unscaled. Returns a new `trainable`.
    """
    adapter = trainable[ADAPTER]
    projector = Projector(llama_config.hidden_size)  # float32, as the parameters.
    items = np.asarray(item_table[:len(iid_rows)], np.float32)

    def preload(rows, projector_params, embed):
        projected = projector.apply({ADAPTER: projector_params}, items)
        target_norm = jnp.linalg.norm(embed.astype(jnp.float32), axis=-1).mean()
        scale = target_norm / jnp.maximum(jnp.linalg.norm(projected, axis=-1).mean(), 1e-12)
        return rows.at[np.asarray(iid_rows)].set((projected * scale).astype(rows.dtype))

    rows = adapter["new_token_embedding"]
    # One compiled function; the rows keep their initialised layout on a mesh.
    updated = jax.jit(preload, out_shardings=getattr(rows, "sharding",
                                                     None))(rows, adapter["projector"], embed_table)
    return dict(trainable, **{ADAPTER: dict(adapter, new_token_embedding=updated)})
