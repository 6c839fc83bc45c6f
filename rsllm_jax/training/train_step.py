"""One jitted training step over the trainable collections only.

The frozen base ("params") is an argument, not part of the state: no gradients, no optimiser
state and no checkpoint for it. The caller jits the step with the state donated, so XLA
updates it in place.
"""

import flax
import jax
import jax.numpy as jnp
import optax

from rsllm_jax.training import losses


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: dict  # {"lora": ..., "adapter": ...}
    opt_state: optax.OptState
    rng: jax.Array


def create_state(trainable, optimizer, seed):
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable,
                      opt_state=optimizer.init(trainable),
                      rng=jax.random.PRNGKey(seed))  # Raw uint32 key: orbax saves it as is.


def make_loss_fn(model, train_config, with_target_tower):
    c = train_config

    def loss_fn(trainable, frozen, batch, item_table, rng):
        rngs = {"dropout": rng} if not model.deterministic else {}
        outputs = model.apply({**frozen, **trainable}, batch, item_table,
                              with_target_tower=with_target_tower, rngs=rngs)
        return losses.rsllm_loss(outputs, batch, c.gamma, c.beta, c.temperature,
                                 c.symmetric_infonce)

    return loss_fn


def make_train_step(model, optimizer, train_config, with_target_tower=True):
    """(state, frozen, batch, item_table) → (state, metrics); jit it with the state donated."""
    loss_fn = make_loss_fn(model, train_config, with_target_tower)

    def train_step(state, frozen, batch, item_table):
        rng, step_rng = jax.random.split(state.rng)
        (_, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.trainable, frozen, batch, item_table, step_rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = dict(parts, grad_norm=optax.tree.norm(grads))
        return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state,
                             rng=rng), metrics

    return train_step


def make_eval_step(model, train_config, with_target_tower=True):
    """(trainable, frozen, batch, item_table) → loss parts, without dropout."""
    loss_fn = make_loss_fn(model.clone(deterministic=True), train_config, with_target_tower)

    def eval_step(trainable, frozen, batch, item_table):
        return loss_fn(trainable, frozen, batch, item_table, jax.random.key(0))[1]

    return eval_step
