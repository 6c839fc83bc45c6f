"""LoRA: low-rank adapters kept in their own Flax variable collection.

A projection with kernel `W` of shape (in..., out...) gets factors `a` (in..., r) and
`b` (r, out...) in the `"lora"` collection, so the trainable tree is a collection rather
than a naming convention. In PyTorch/peft terms `a` is `lora_A.weight.T` and `b` is
`lora_B.weight.T`; the update is `x @ W + (alpha / r) * dropout(x) @ a @ b`, and merging
gives `W + (alpha / r) * a @ b` (peft's scale, so exports match peft exactly).
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

LORA = "lora"
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Rank, alpha, dropout and target projections (a subset of `TARGETS`)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS
    # The factors are trained: float32 whatever the frozen kernel's storage dtype (a bf16 base
    # halves the memory of a 7B model; bf16 factors would lose small Adam updates).
    param_dtype: str = "float32"

    def __post_init__(self):
        unknown = set(self.targets) - set(TARGETS)
        if unknown:
            raise ValueError(f"Unknown LoRA targets {sorted(unknown)}; choose from {TARGETS}.")
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.rank}.")
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class Projection(nn.Module):
    """Bias-free linear map over the trailing `in_dims` axes, with optional LoRA.

    Attributes:
      features: output dims, e.g. (heads, head_dim).
      axes: logical axis names of the kernel, (in..., out...).
      in_dims: how many trailing input axes are contracted.
      lora: adapter settings, or None for a plain projection.
    """

    features: tuple[int, ...]
    axes: tuple[str, ...]
    in_dims: int = 1
    lora: LoraConfig | None = None
    deterministic: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x):
        in_shape = x.shape[x.ndim - self.in_dims:]
        in_axes = self.axes[:self.in_dims]
        out_axes = self.axes[self.in_dims:]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, self.axes),
            in_shape + tuple(self.features),
            self.param_dtype,
        )
        x = x.astype(self.dtype)
        y = _contract(x, kernel.astype(self.dtype), self.in_dims)
        if self.lora is None:
            return y

        r = self.lora.rank
        lora_dtype = jnp.dtype(self.lora.param_dtype)
        # peft's kaiming_uniform(a=sqrt(5)) on lora_A: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        init_a = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform",
                                                  in_axis=tuple(range(self.in_dims)))
        a = self.variable(
            LORA,
            "a",
            nn.with_logical_partitioning(
                lambda: init_a(self.make_rng("params"), in_shape + (r, ), lora_dtype),
                in_axes + (None, ),
            ),
        ).value
        b = self.variable(
            LORA,
            "b",
            nn.with_logical_partitioning(
                lambda: jnp.zeros((r, ) + tuple(self.features), lora_dtype), (None, ) + out_axes),
        ).value
        h = nn.Dropout(self.lora.dropout)(x, deterministic=self.deterministic)
        h = _contract(h, a.astype(self.dtype), self.in_dims)
        return y + self.lora.scale * _contract(h, b.astype(self.dtype), 1)


def _contract(x, kernel, in_dims):
    dims = (tuple(range(x.ndim - in_dims, x.ndim)), tuple(range(in_dims)))
    return jax.lax.dot_general(x, kernel, (dims, ((), ())))


def lora_delta(a, b, kernel_ndim: int, scale: float):
    """(alpha/r) * a @ b reshaped like the kernel; handles a leading stacked-layers axis."""
    lead = a.ndim + b.ndim - 2 - kernel_ndim  # 1 when layers are stacked (nn.scan), else 0
    r = a.shape[-1]
    a2 = a.reshape(a.shape[:lead] + (-1, r))
    b2 = b.reshape(b.shape[:lead] + (r, -1))
    delta = jnp.matmul(a2.astype(jnp.float32), b2.astype(jnp.float32)) * scale
    return delta.reshape(a.shape[:-1] + b.shape[lead + 1:])


def merge_lora(params, lora, config: LoraConfig):
    """Returns params with every LoRA pair folded in: W + (alpha/r) * a @ b (pure, jittable)."""

    def merge(p, l):
        if not isinstance(l, dict):
            raise ValueError("LoRA tree does not match the parameter tree.")
        out = dict(p)
        for name, sub in l.items():
            if name not in p:
                raise KeyError(f"LoRA factors for {name!r} have no matching parameters.")
            if set(sub) == {"a", "b"} and not isinstance(sub["a"], dict):
                kernel = p[name]["kernel"]
                delta = lora_delta(sub["a"], sub["b"], kernel.ndim, config.scale)
                out[name] = dict(p[name],
                                 kernel=(kernel.astype(jnp.float32) + delta).astype(kernel.dtype))
            else:
                out[name] = merge(p[name], sub)
        return out

    return merge(_as_dict(params), _as_dict(lora))


def _as_dict(tree):
    if hasattr(tree, "unfreeze"):
        tree = tree.unfreeze()
    return jax.tree_util.tree_map(lambda x: x, dict(tree),
                                  is_leaf=lambda x: not isinstance(x, dict))


def count_params(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))
