"""Shardings of a stage's train step: state, frozen base, batch and item table on a mesh.

Everything derives from the logical axis names the modules give their variables: the abstract
(boxed) variables from `jax.eval_shape(init)` give the trainable and frozen shardings, and the
optimiser state takes its parameters' shardings by initialising it on the boxed tree under
`jax.eval_shape` (Adam's moments mirror the parameters, so they inherit the boxes). The batch
is split on its leading axis over the mesh axes the rules give `batch` (data×fsdp for fsdp_tp);
the item table is replicated. Layouts are checked before anything compiles.
"""

import contextlib
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from rsllm_jax.models import llama, rsllm
from rsllm_jax.parallel import layouts, mesh as mesh_lib
from rsllm_jax.training import train_step as train_step_lib


def boxed_trainable(model, batch, item_table):
    """Abstract boxed {"lora", "adapter"} variables (shapes and logical axes; no allocation)."""

    def init(batch, item_table):
        variables = model.init(jax.random.key(0), batch, item_table)
        return {k: v for k, v in variables.items() if k in rsllm.TRAINABLE}

    return jax.eval_shape(init, batch, item_table)


def boxed_base(llama_config):
    """Abstract boxed frozen tree {"params": {"llm": base Llama params}}."""
    base = llama.Llama(llama_config.replace(lora=None))
    params = mesh_lib.abstract_variables(base, jnp.ones((1, 1), jnp.int32))["params"]
    return {"params": {"llm": params}}


def _with_shardings(boxed, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nn.unbox(boxed), shardings)


@dataclasses.dataclass(frozen=True)
class StageLayout:
    """The mesh, rules and every argument's sharding of one stage's train step."""

    mesh: jax.sharding.Mesh
    rules: object
    state: object  # TrainState of NamedShardings
    frozen: object  # {"params": {"llm": ...}} of NamedShardings
    abstract_state: object  # TrainState of sharded ShapeDtypeStructs (restore targets)
    abstract_frozen: object

    @property
    def batch(self):
        """One sharding for every batch array: leading axis split over the batch mesh axes."""
        return mesh_lib.batch_sharding(self.mesh, self.rules)

    @property
    def micro_batches(self):
        """The train step's stacked micro-batches (k, B, ...): the rows axis split as `batch`,
        each device holding its rows of every micro-batch."""
        return NamedSharding(self.mesh,
                             PartitionSpec(None,
                                           mesh_lib.spec_for(("batch", ), self.rules)[0]))

    @property
    def replicated(self):
        return mesh_lib.replicated(self.mesh)

    @contextlib.contextmanager
    def activate(self):
        with mesh_lib.use_mesh(self.mesh, self.rules):
            yield

    def put_batch(self, batch, stacked=False):
        """This host's slice of a global batch → global arrays (`mesh.global_batch`);
        `stacked`: micro-batches (k, rows, ...) (`micro_batches` sharding)."""
        return mesh_lib.global_batch(batch, self.micro_batches if stacked else self.batch, stacked)

    def put_replicated(self, x):
        return jax.device_put(np.asarray(x), self.replicated)

    def put_frozen(self, frozen):
        """The frozen tree on its shardings (a no-op for arrays already there)."""
        return jax.device_put(frozen, self.frozen)


def _abstract(x):
    return jax.ShapeDtypeStruct(np.shape(x), jax.dtypes.canonicalize_dtype(x.dtype))


def make_layout(mesh, rules, model, optimizer, seed, example_batch, item_table):
    """The StageLayout of `model` (an RSLLM) trained by `optimizer`, checked for divisibility.

    `example_batch` and `item_table` may be arrays or ShapeDtypeStructs (only shapes are used).
    """
    layouts.validate_model(mesh, rules, model.config)
    example_batch = {k: _abstract(v) for k, v in example_batch.items()}
    item_table = _abstract(item_table)
    trainable = boxed_trainable(model, example_batch, item_table)
    state_boxed = jax.eval_shape(lambda t: train_step_lib.create_state(t, optimizer, seed),
                                 trainable)
    state = mesh_lib.logical_shardings(state_boxed, mesh, rules)
    frozen_boxed = boxed_base(model.config)
    frozen = mesh_lib.logical_shardings(frozen_boxed, mesh, rules)
    abstract_state = _with_shardings(state_boxed, state)
    abstract_frozen = _with_shardings(frozen_boxed, frozen)
    layouts.check_divisible(abstract_state, state, "train-state array")
    layouts.check_divisible(abstract_frozen, frozen, "frozen base parameter")
    return StageLayout(mesh, rules, state, frozen, abstract_state, abstract_frozen)


class ShardedFunction:
    """A jitted function whose tracing sees the mesh and the logical-axis rules.

    Flax's activation constraints are no-ops without a mesh in context, so every call and
    `lower` runs under `layout.activate()`. `place` maps positional arguments before the
    call (e.g. host batches → global arrays).
    """

    def __init__(self, fn, layout, in_shardings, out_shardings, donate_argnums=(), place=None):
        self._jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                               donate_argnums=donate_argnums)
        self._layout = layout
        self._place = place or {}

    def _args(self, args):
        return tuple(self._place[i](a) if i in self._place else a for i, a in enumerate(args))

    def __call__(self, *args):
        with self._layout.activate():
            return self._jitted(*self._args(args))

    def lower(self, *args):
        with self._layout.activate():
            return self._jitted.lower(*args)


def _placer(layout, stacked=False):
    sharding = layout.micro_batches if stacked else layout.batch

    def place(batch):
        if all(isinstance(v, jax.Array) and v.sharding == sharding for v in batch.values()):
            return batch
        return layout.put_batch(batch, stacked)

    return place


def jit_train_step(train_step, layout):
    """(state, frozen, micro_batches, item_table) → (state, metrics) with explicit shardings,
    the state donated; host micro-batches (k, rows, ...) are placed as global arrays."""
    return ShardedFunction(
        train_step, layout,
        in_shardings=(layout.state, layout.frozen, layout.micro_batches, layout.replicated),
        out_shardings=(layout.state, layout.replicated), donate_argnums=0,
        place={2: _placer(layout, stacked=True)})


def jit_eval_step(eval_step, layout):
    """(trainable, frozen, batch, item_table) → loss parts, with explicit shardings."""
    return ShardedFunction(
        eval_step, layout,
        in_shardings=(layout.state.trainable, layout.frozen, layout.batch, layout.replicated),
        out_shardings=layout.replicated, place={2: _placer(layout)})


def create_state(trainable, optimizer, seed, layout):
    """The train state created directly in its shards (`trainable` already on its shardings)."""
    return jax.jit(lambda t: train_step_lib.create_state(t, optimizer, seed),
                   out_shardings=layout.state)(trainable)
