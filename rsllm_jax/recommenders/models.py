"""The conventional sequential recommenders: GRU4Rec, Caser and SASRec (Flax Linen).

Architectures and sizes follow LLaRA's recommender code, which RSLLM uses as its behaviour
encoders: hidden 64, histories of 10 items, right-padded; a linear head over all
items. Parameters are laid out so that LLaRA's released PyTorch checkpoints load with
transposes only (see `rsllm_jax/checkpoint/llara_rec.py`).

Every model maps (history (B, L) item ids, history_len (B,)) to a user state (B, H) with
`encode`, and scores items with the shared linear head: `__call__` gives scores over the whole
catalogue (B, num_items), `score_items` only for chosen items (B, K), which is all the BCE loss
needs. Positions >= history_len are padding: they are masked by position, so whatever ids they
hold never change a score.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

MODELS = ("gru4rec", "caser", "sasrec")


def _uniform(limit):
    """U(-limit, limit): PyTorch's default init for Linear/GRU weights and biases."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -limit, limit)

    return init


def _normal(std):

    def init(key, shape, dtype=jnp.float32):
        return std * jax.random.normal(key, shape, dtype)

    return init


def _constant(value):

    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.full(shape, value, dtype)

    return init


def valid_positions(history_len, max_len):
    """(B, L) True where a history position holds a real item (right padding)."""
    return jnp.arange(max_len)[None, :] < history_len[:, None]


class SequentialRecommender(nn.Module):
    """Shared parts: the item-embedding table (num_items + 1 rows, the last is padding) and
    the output head over all items. Subclasses define `encode`."""

    num_items: int
    hidden_size: int = 64
    max_len: int = 10
    embedding_std: float = 0.01  # LLaRA: N(0, 0.01) for GRU/Caser, N(0, 1) for SASRec.

    def setup_head(self, in_features):
        self.item_embeddings = nn.Embed(self.num_items + 1, self.hidden_size,
                                        embedding_init=_normal(self.embedding_std))
        limit = 1.0 / math.sqrt(in_features)  # torch.nn.Linear's default init.
        self.head_kernel = self.param("head_kernel", _uniform(limit), (in_features, self.num_items))
        self.head_bias = self.param("head_bias", _uniform(limit), (self.num_items, ))

    def __call__(self, history, history_len, deterministic=True):
        """Scores over the whole catalogue, (B, num_items)."""
        state = self.encode(history, history_len, deterministic)
        return state @ self.head_kernel + self.head_bias

    def score_items(self, history, history_len, items, deterministic=True):
        """Scores of chosen items only, (B, K) for items (B, K): no (B, num_items) product."""
        state = self.encode(history, history_len, deterministic)
        kernel = jnp.take(self.head_kernel.T, items, axis=0)  # (B, K, in_features)
        return jnp.einsum("bf,bkf->bk", state, kernel) + jnp.take(self.head_bias, items)

    def embed_history(self, history, history_len):
        """Item embeddings of the history with padding positions zeroed, and the valid mask."""
        valid = valid_positions(history_len, history.shape[1])
        return self.item_embeddings(history) * valid[..., None], valid


class GRU4Rec(SequentialRecommender):
    """1-layer GRU over the history; the hidden state after the last real item is the user
    state (LLaRA's `GRU`, i.e. GRU4Rec without session-parallel mini-batches).

    Gates use PyTorch's layout (r, z, n) and bias placement, so nn.GRU weights load as-is.
    """

    def setup(self):
        self.setup_head(self.hidden_size)
        h = self.hidden_size
        limit = 1.0 / math.sqrt(h)
        self.input_kernel = self.param("input_kernel", _uniform(limit), (h, 3 * h))
        self.input_bias = self.param("input_bias", _uniform(limit), (3 * h, ))
        self.hidden_kernel = self.param("hidden_kernel", _uniform(limit), (h, 3 * h))
        self.hidden_bias = self.param("hidden_bias", _uniform(limit), (3 * h, ))

    def encode(self, history, history_len, deterministic=True):
        del deterministic  # No dropout in LLaRA's GRU.
        embedded, valid = self.embed_history(history, history_len)
        gates_x = embedded @ self.input_kernel + self.input_bias  # (B, L, 3H), all steps at once.
        hidden = jnp.zeros((history.shape[0], self.hidden_size), embedded.dtype)
        for t in range(history.shape[1]):  # L = 10: unrolled, cheaper than a scan here.
            x_r, x_z, x_n = jnp.split(gates_x[:, t], 3, axis=-1)
            h_r, h_z, h_n = jnp.split(hidden @ self.hidden_kernel + self.hidden_bias, 3, axis=-1)
            reset = jax.nn.sigmoid(x_r + h_r)
            update = jax.nn.sigmoid(x_z + h_z)
            candidate = jnp.tanh(x_n + reset * h_n)
            new_hidden = (1.0 - update) * candidate + update * hidden
            # Padding steps keep the state: the final state is the one after the last item.
            hidden = jnp.where(valid[:, t, None], new_hidden, hidden)
        return hidden


class Caser(SequentialRecommender):
    """Caser (Tang & Wang 2018) as in LLaRA: horizontal convolutions of heights 2, 3, 4 with
    16 filters each, max-pooled over time, plus one vertical convolution over the positions;
    ReLU, dropout 0.1, then the head over [horizontal (48), vertical (64)] = 112 features."""

    num_filters: int = 16
    filter_sizes: tuple = (2, 3, 4)
    dropout_rate: float = 0.1

    def setup(self):
        self.setup_head(self.num_filters * len(self.filter_sizes) + self.hidden_size)
        h, n = self.hidden_size, self.num_filters
        # Xavier-normal with PyTorch's fan computation for Conv2d(1, n, (size, h)); bias 0.1.
        self.horizontal_kernels = [
            self.param(f"horizontal_kernel_{size}",
                       _normal(math.sqrt(2.0 / (size * h + n * size * h))), (size, h, n))
            for size in self.filter_sizes
        ]
        self.horizontal_biases = [
            self.param(f"horizontal_bias_{size}", _constant(0.1), (n, ))
            for size in self.filter_sizes
        ]
        self.vertical_kernel = self.param("vertical_kernel",
                                          _normal(math.sqrt(2.0 / (2 * self.max_len))),
                                          (self.max_len, ))
        self.vertical_bias = self.param("vertical_bias", _constant(0.1), ())
        self.dropout = nn.Dropout(self.dropout_rate)

    def encode(self, history, history_len, deterministic=True):
        embedded, _ = self.embed_history(history, history_len)  # (B, L, H)
        length = history.shape[1]
        pooled = []
        for size, kernel, bias in zip(self.filter_sizes, self.horizontal_kernels,
                                      self.horizontal_biases):
            # A filter spanning `size` consecutive items and the whole embedding width.
            windows = jnp.stack([embedded[:, i:length - size + 1 + i] for i in range(size)], 2)
            out = jnp.einsum("bwsh,shn->bwn", windows, kernel) + bias
            pooled.append(jax.nn.relu(out).max(axis=1))
        vertical = jax.nn.relu(
            jnp.einsum("blh,l->bh", embedded, self.vertical_kernel) + self.vertical_bias)
        features = jnp.concatenate(pooled + [vertical], axis=-1)
        return self.dropout(features, deterministic=deterministic)


class SASRec(SequentialRecommender):
    """SASRec (Kang & McAuley 2018) as in LLaRA: item + learned positional embeddings,
    dropout, one causal self-attention block (queries LayerNorm-ed, keys/values not; residual
    on the normalised queries), a pointwise feed-forward block with its own residual
    LayerNorm, a final LayerNorm; the state at the last real position feeds the head."""

    num_heads: int = 1
    dropout_rate: float = 0.1
    embedding_std: float = 1.0  # LLaRA initialises SASRec's item embeddings with N(0, 1).

    def setup(self):
        self.setup_head(self.hidden_size)
        h = self.hidden_size
        if h % self.num_heads:
            raise ValueError(f"hidden size {h} is not divisible by {self.num_heads} heads")
        self.positional_embeddings = nn.Embed(self.max_len, h, embedding_init=_normal(1.0))
        # PyTorch LayerNorm's epsilon (1e-5), not Flax's default, so imported weights agree.
        self.ln_1, self.ln_2, self.ln_3, self.ffn_norm = [
            nn.LayerNorm(epsilon=1e-5) for _ in range(4)
        ]
        dense = lambda: nn.Dense(h, kernel_init=_uniform(1 / math.sqrt(h)), bias_init=_uniform(
            1 / math.sqrt(h)))
        self.query, self.key, self.value = dense(), dense(), dense()
        self.ffn_in, self.ffn_out = dense(), dense()
        self.dropout = nn.Dropout(self.dropout_rate)

    def sequence_states(self, history, history_len, deterministic=True):
        """Per-position states (B, L, H); position t depends only on items 0..t."""
        batch, length = history.shape
        valid = valid_positions(history_len, length)
        seq = self.item_embeddings(history) + self.positional_embeddings(jnp.arange(length))
        seq = self.dropout(seq, deterministic=deterministic) * valid[..., None]
        queries = self.ln_1(seq)
        split = lambda x: x.reshape(batch, length, self.num_heads, -1)
        q, k, v = split(self.query(queries)), split(self.key(seq)), split(self.value(seq))
        # LLaRA scales by sqrt(hidden size), not sqrt(head size); the same for one head.
        logits = jnp.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(self.hidden_size)
        causal = jnp.tril(jnp.ones((length, length), bool))
        allowed = causal[None, None] & valid[:, None, None, :]
        weights = jax.nn.softmax(jnp.where(allowed, logits, -1e9), axis=-1)
        weights = weights * valid[:, None, :, None]  # Padding queries attend to nothing.
        weights = self.dropout(weights, deterministic=deterministic)
        attended = jnp.einsum("bnqk,bknd->bqnd", weights, v).reshape(batch, length, -1)
        attended = attended + queries
        ffn_input = self.ln_2(attended)
        ffn = self.ffn_out(jax.nn.relu(self.ffn_in(ffn_input)))
        ffn = self.ffn_norm(self.dropout(ffn, deterministic=deterministic) + ffn_input)
        return self.ln_3(ffn * valid[..., None])

    def encode(self, history, history_len, deterministic=True):
        states = self.sequence_states(history, history_len, deterministic)
        last = jnp.maximum(history_len - 1, 0)
        return jnp.take_along_axis(states, last[:, None, None], axis=1)[:, 0]


def build_model(name, num_items, *, hidden_size=64, max_len=10, dropout_rate=0.1, num_heads=1,
                num_filters=16, filter_sizes=(2, 3, 4)):
    """The recommender called `name` (gru4rec | caser | sasrec) with LLaRA's sizes."""
    if name == "gru4rec":
        return GRU4Rec(num_items, hidden_size, max_len)
    if name == "caser":
        return Caser(num_items, hidden_size, max_len, num_filters=num_filters,
                     filter_sizes=tuple(filter_sizes), dropout_rate=dropout_rate)
    if name == "sasrec":
        return SASRec(num_items, hidden_size, max_len, num_heads=num_heads,
                      dropout_rate=dropout_rate)
    raise ValueError(f"unknown recommender {name!r}; choose one of {MODELS}")


def item_embedding_table(params):
    """The (num_items + 1, H) item-embedding table of any of the models' params."""
    return params["item_embeddings"]["embedding"]
