"""Named mesh layouts (presets), the mesh of a config, and layout checks made before compiling.

A preset fixes the (data, fsdp, tensor) shape for a machine:

  single         1 device: the first one, however many there are (debugging on one GPU of
                 a multi-GPU host; the 1-device reference of the 8-device presets).
  data8          one host, 8 devices, pure data parallelism: every device holds all the
                 parameters; the cheapest collectives (one gradient all-reduce of the small
                 LoRA/adapter tree). Fits only when a whole base model fits one device.
  fsdp8          one host, 8 devices, the batch over all 8 and every parameter (frozen base,
                 LoRA, adapter, optimiser state) sharded 8 ways on its `embed` axis; the layout
                 for a 7B base on 8 GPUs/chips.
  data2_tensor4  one host, 8 devices: tensor parallelism over 4 devices (heads, MLP, vocab;
                 needs num_kv_heads divisible by 4) times 2 data-parallel replicas.
  pod32          32 chips over 8 hosts of 4 (a TPU v5p-64 slice, whose chips all share the ICI
                 torus): fsdp 8 (parameters sharded over 2 hosts' chips) times data 4; global
                 batch divisible by 32.

`config.mesh.preset` picks one; without a preset `config.mesh.shape` ("data,fsdp,tensor", one
entry may be -1 for the remaining devices) does.
"""

import math

import jax

from rsllm_jax import config_lists
from rsllm_jax.parallel import mesh as mesh_lib

PRESETS = {
    "single": (1, 1, 1),
    "data8": (8, 1, 1),
    "fsdp8": (1, 8, 1),
    "data2_tensor4": (2, 1, 4),
    "pod32": (4, 8, 1),
}


def parse_shape(shape):
    """'1,-1,1' (or a sequence) → a tuple of 3 ints."""
    given = shape
    try:
        shape = config_lists.ints(shape, "config.mesh.shape")
    except ValueError:
        shape = ()
    if len(shape) != 3:
        raise ValueError(f"config.mesh.shape={given!r}: expected three comma-separated integers "
                         "data,fsdp,tensor (one may be -1)")
    return shape


def mesh_shape(mesh_config):
    """The (data, fsdp, tensor) shape a `config.mesh` section asks for (may hold one -1)."""
    preset = mesh_config.get("preset", "")
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"unknown mesh preset {preset!r}; known: {sorted(PRESETS)}")
        return PRESETS[preset]
    return parse_shape(mesh_config.get("shape", "1,-1,1"))


def resolve_shape(shape, num_devices):
    """`shape` with its -1 filled in, checked against the number of devices."""
    shape = list(parse_shape(shape))
    if shape.count(-1) > 1:
        raise ValueError(f"at most one mesh dimension may be -1, got {tuple(shape)}")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh dimensions must be positive (or one -1), got {tuple(shape)}")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if num_devices % known:
            raise ValueError(f"mesh shape {tuple(shape)}: {num_devices} devices are not a "
                             f"multiple of {known}")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh shape {tuple(shape)} (data, fsdp, tensor) needs "
                         f"{math.prod(shape)} devices, but {num_devices} are available")
    return tuple(shape)


def mesh_from_config(mesh_config, devices=None):
    """(mesh, rules name) for a `config.mesh` section; clear errors for impossible shapes."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config)
    if mesh_config.get("preset", "") == "single":
        devices = devices[:1]
    try:
        shape = resolve_shape(shape, len(devices))
    except ValueError as e:
        preset = mesh_config.get("preset", "")
        raise ValueError(f"{e}{f' (mesh preset {preset!r})' if preset else ''}") from None
    rules = mesh_config.get("rules", "fsdp_tp")
    mesh_lib.get_rules(rules)  # Unknown names fail here, not at the first constraint.
    return mesh_lib.make_mesh(shape, devices), rules


def axis_size(mesh, axes):
    """Devices along a PartitionSpec entry: None, one axis name, or a tuple of names."""
    if axes is None:
        return 1
    if isinstance(axes, str):
        axes = (axes, )
    return math.prod(mesh.shape[a] for a in axes)


def batch_axis_size(mesh, rules):
    """How many ways the rules split the `batch` axis on this mesh (data×fsdp for fsdp_tp)."""
    return axis_size(mesh, mesh_lib.spec_for(("batch", ), rules)[0])


def check_divisible(abstract_tree, shardings, what):
    """Raises naming the first array whose dimensions its NamedSharding cannot split evenly."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(abstract_tree)
    sharding_leaves = jax.tree_util.tree_leaves(shardings)
    if len(leaves) != len(sharding_leaves):
        raise ValueError(f"{what}: {len(leaves)} arrays but {len(sharding_leaves)} shardings")
    for (path, x), sharding in zip(leaves, sharding_leaves):
        spec = tuple(sharding.spec) + (None, ) * (len(x.shape) - len(sharding.spec))
        for dim, (size, axes) in enumerate(zip(x.shape, spec)):
            ways = axis_size(sharding.mesh, axes)
            if size % ways:
                raise ValueError(
                    f"{what} {jax.tree_util.keystr(path)} of shape {tuple(x.shape)}: dimension "
                    f"{dim} ({size}) cannot be split {ways} ways over mesh axes {axes} "
                    f"(mesh {dict(sharding.mesh.shape)}); choose another mesh shape or rules")


def validate_model(mesh, rules, llama_config, global_batch_size=None):
    """Clear errors for layouts that cannot work, raised before loading or compiling."""
    if global_batch_size is not None:
        ways = batch_axis_size(mesh, rules)
        if global_batch_size % ways:
            raise ValueError(
                f"global batch size {global_batch_size} is not divisible by the {ways} devices "
                f"the batch is split over (mesh {dict(mesh.shape)}, rules "
                f"{rules if isinstance(rules, str) else 'custom'}); change "
                "config.train.batch_size or the mesh")
    for name, count in (("num_heads", llama_config.num_heads), ("num_kv_heads",
                                                                llama_config.num_kv_heads)):
        axes = mesh_lib.spec_for(("heads" if name == "num_heads" else "kv_heads", ), rules)[0]
        ways = axis_size(mesh, axes)
        if count % ways:
            raise ValueError(f"the model's {name} = {count} is not divisible by the {ways}-way "
                             f"tensor axis (mesh {dict(mesh.shape)}); use a tensor size that "
                             f"divides {name}")
