"""Device meshes, logical-axis rules and sharded initialisation.

Modules name array axes logically (`batch`, `embed`, `heads`, ...); a rules table maps those
names to the mesh axes `(data, fsdp, tensor)`. Flax assigns mesh axes in rule order and skips a
mesh axis already used by the same array, so one table serves parameters (`embed` -> fsdp) and
activations (`batch` takes data+fsdp first, so `embed` stays unsharded there).
"""

import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Data parallel over data+fsdp, parameters sharded FSDP-style over `fsdp` and Megatron-style
# over `tensor` (heads, MLP hidden, vocabulary).
FSDP_TP_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("layers", None),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("embed", "fsdp"),
)
# Pure data parallelism: parameters replicated.
DATA_PARALLEL_RULES = (("batch", ("data", "fsdp", "tensor")),)

RULES = {"fsdp_tp": FSDP_TP_RULES, "data_parallel": DATA_PARALLEL_RULES}


def get_rules(name_or_rules) -> tuple:
    """A rules table by name (`fsdp_tp`, `data_parallel`) or a given sequence of pairs."""
    if isinstance(name_or_rules, str):
        if name_or_rules not in RULES:
            raise ValueError(f"Unknown sharding rules {name_or_rules!r}; known: {sorted(RULES)}.")
        return RULES[name_or_rules]
    return tuple(
        (name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in name_or_rules
    )


def make_mesh(shape=(-1, 1, 1), devices=None) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types; one entry of `shape` may be -1."""
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if len(shape) != 3:
        raise ValueError(f"Mesh shape must have 3 entries (data, fsdp, tensor), got {shape}.")
    if shape.count(-1) > 1:
        raise ValueError(f"At most one mesh dimension may be -1, got {shape}.")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"Mesh shape {tuple(shape)} needs {math.prod(shape)} devices, have {len(devices)}."
        )
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


@contextlib.contextmanager
def use_mesh(mesh, rules):
    """Activates the mesh and the logical-axis rules (activation constraints need both)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(get_rules(rules)):
        yield


def logical_shardings(abstract_tree, mesh, rules):
    """NamedShardings for a tree of `nn.LogicallyPartitioned` (e.g. from `jax.eval_shape(init)`)."""
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, get_rules(rules))


def spec_for(logical_axes, rules) -> PartitionSpec:
    """The mesh PartitionSpec that `rules` give an array with these logical axis names."""
    return nn.logical_to_mesh_axes(tuple(logical_axes), get_rules(rules))


def init_sharded(
    model, rng, *init_args, mesh=None, rules="fsdp_tp", collections=None, **init_kwargs
):
    """Initialises `model` with every variable created directly in its shards.

    `jax.eval_shape` gives shapes and logical axes without allocating; the init then runs
    under `jax.jit(out_shardings=...)`, so no host ever holds a whole parameter. With
    `collections` (e.g. `("lora",)`) only those are returned, and XLA drops the rest of init.
    Returns the variables, unboxed.
    """

    def init(rng):
        variables = model.init(rng, *init_args, **init_kwargs)
        if collections is not None:
            variables = {k: v for k, v in variables.items() if k in collections}
        return variables

    abstract = jax.eval_shape(init, rng)
    if mesh is None:
        shardings = None
    else:
        shardings = logical_shardings(abstract, mesh, rules)
    with contextlib.ExitStack() as stack:
        if mesh is not None:
            stack.enter_context(use_mesh(mesh, rules))
        variables = jax.jit(init, out_shardings=shardings)(rng)
    return nn.unbox(variables)


def abstract_variables(model, *init_args, **init_kwargs):
    """Boxed ShapeDtypeStructs of every collection (shapes and logical axes, nothing allocated)."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *init_args, **init_kwargs))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def host_array(x) -> np.ndarray:
    """A fully addressable (single-host) jax array as numpy."""
    return np.asarray(jax.device_get(x))
