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
DATA_PARALLEL_RULES = (("batch", ("data", "fsdp", "tensor")), )

RULES = {"fsdp_tp": FSDP_TP_RULES, "data_parallel": DATA_PARALLEL_RULES}


def get_rules(name_or_rules) -> tuple:
    """A rules table by name (`fsdp_tp`, `data_parallel`) or a given sequence of pairs."""
    if isinstance(name_or_rules, str):
        if name_or_rules not in RULES:
            raise ValueError(f"Unknown sharding rules {name_or_rules!r}; known: {sorted(RULES)}.")
        return RULES[name_or_rules]
    return tuple(
        (name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in name_or_rules)


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
            f"Mesh shape {tuple(shape)} needs {math.prod(shape)} devices, have {len(devices)}.")
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto, ) * 3, devices=devices)


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


def init_sharded(model, rng, *init_args, mesh=None, rules="fsdp_tp", collections=None,
                 **init_kwargs):
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


def batch_sharding(mesh, rules) -> NamedSharding:
    """A batch array's sharding: its leading (rows) axis split over the mesh axes `rules` give
    the logical axis `batch`."""
    return NamedSharding(mesh, PartitionSpec(spec_for(("batch", ), rules)[0]))


def host_array(x) -> np.ndarray:
    """A fully addressable (single-host) jax array as numpy."""
    return np.asarray(jax.device_get(x))


# --- several processes -----------------------------------------------------------------------
# Every process runs the same program (JAX's multi-controller model): arrays that live on a
# mesh of all processes' devices ("global" arrays) are built from what each process holds.


def data_parallel_mesh(batch_size=None):
    """A (devices, 1, 1) mesh over every device of every process: small models (the
    recommenders) replicated, the batch split over all devices. With `batch_size`, checks
    that the batch splits evenly (ValueError otherwise)."""
    mesh = make_mesh((-1, 1, 1))
    if batch_size is not None and batch_size % mesh.size:
        raise ValueError(f"batch size {batch_size} is not divisible by the {mesh.size} devices "
                         "it is split over; change the batch size or the device count")
    return mesh


def replicate(tree, mesh):
    """Host values, the same on every process (numpy or single-device arrays), as arrays
    replicated over every device of `mesh`, bit for bit."""
    sharding = replicated(mesh)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def global_batch(batch, sharding, stacked=False, agree_shapes=True):
    """This process's slice of a global batch (a dict of host arrays) → global arrays split as
    `sharding` on the rows axis (axis 0, or 1 when `stacked`: micro-batches (k, rows, ...)).

    With several processes, length buckets may differ between hosts: with `agree_shapes` every
    array is right-padded with zeros to the largest shape any host has (zeros are collate's
    padding: pad id 0, masks False), so all hosts build the same global shapes.
    """
    batch = {k: np.asarray(v) for k, v in batch.items()}
    if agree_shapes and jax.process_count() > 1:
        batch = _agree_shapes(batch)
    axis = int(stacked)
    rows = {v.shape[axis] for v in batch.values()}
    if len(rows) != 1:
        raise ValueError(f"batch arrays disagree on the number of rows: {sorted(rows)}")
    global_rows = rows.pop() * jax.process_count()
    spec = sharding.spec[axis] if len(sharding.spec) > axis else None
    ways = math.prod(sharding.mesh.shape[a]
                     for a in ((spec, ) if isinstance(spec, str) else (spec or ())))
    if global_rows % ways:
        raise ValueError(f"global batch of {global_rows} rows is not divisible by the {ways} "
                         f"devices the batch is split over (mesh {dict(sharding.mesh.shape)})")
    return {
        k: jax.make_array_from_process_local_data(
            sharding, v, v.shape[:axis] + (global_rows, ) + v.shape[axis + 1:])
        for k, v in batch.items()
    }


def _agree_shapes(batch):
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    keys = sorted(batch)
    dims = np.array([d for k in keys for d in batch[k].shape], np.int64)
    largest = np.asarray(multihost_utils.process_allgather(dims)).max(axis=0)
    out, i = {}, 0
    for k in keys:
        v = batch[k]
        target = largest[i:i + v.ndim]
        i += v.ndim
        out[k] = np.pad(v, [(0, int(t) - s) for s, t in zip(v.shape, target)])
    return out


def process_sum(value):
    """The sum of a number over all processes (the number itself with one process)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    return np.asarray(multihost_utils.process_allgather(np.asarray(value))).sum()


def gather_to_host(tree):
    """Every array of `tree` whole, as numpy, on every process (all processes must call it)."""
    if jax.process_count() == 1:
        return jax.tree.map(host_array, tree)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def gather_json(value):
    """[the JSON-serialisable `value` of process 0, of process 1, ...] on every process."""
    if jax.process_count() == 1:
        return [value]
    import json  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int64(data.size))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(row[:size].tobytes().decode()) for row, size in zip(gathered, sizes)]


def sync_processes(name):
    """Waits until every process has reached the point named `name` (no-op for one process):
    e.g. process 0 has written a file the others read next."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

        multihost_utils.sync_global_devices(name)


def is_primary():
    """Whether this process writes the run's files (process 0; every process computes)."""
    return jax.process_index() == 0
