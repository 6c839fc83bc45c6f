"""One jitted training step over the trainable collections only.

The frozen base ("params") is an argument, not part of the state: no gradients, no optimiser
state and no checkpoint for it. The caller jits the step with the state donated, so XLA
updates it in place.

A step takes the micro-batches of one update stacked on a leading axis, (k, B, ...), and
applies one optimiser update for the k·B rows, as if they were one batch (the paper's batch of
256 as 8 micro-batches of 32). Gradients of the next-item loss accumulate micro-batch by
micro-batch; the contrastive terms (Eq. 3, 4) need every row of the batch as a negative, so
they are computed by gradient caching (Gao et al. 2021, "Scaling Deep Contrastive Learning
Batch Size under Memory Limited Setup"):

  1. a forward pass over every micro-batch collects the pooled representations g_U, g_UI, g_I
     (k·B × d floats; no activations are kept);
  2. the full-batch InfoNCE terms and their gradient with respect to those representations;
  3. a forward and backward pass per micro-batch of its NIP sum (over the whole batch's answer
     tokens) plus the representations' dot product with that gradient: the sum of these
     gradients is the gradient of L = L_NIP + γ·L_I + β·L_U (Eq. 5) over the k·B rows.

Nothing but the representations grows with k. Pass 1 is the price: one more forward pass of
both towers per micro-batch (README, Performance). With k = 1 the step is a plain
value-and-gradient of Eq. 5; without the contrastive terms, one pass per micro-batch.
"""

import flax
import jax
import jax.numpy as jnp
import optax

from rsllm_jax.models import rsllm
from rsllm_jax.training import losses


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # Micro-batches consumed (k per update).
    trainable: dict  # {"lora": ..., "adapter": ...}
    opt_state: optax.OptState
    rng: jax.Array


def create_state(trainable, optimizer, seed):
    return TrainState(step=jnp.zeros(
        (), jnp.int32), trainable=trainable, opt_state=optimizer.init(trainable),
                      rng=jax.random.PRNGKey(seed))  # Raw uint32 key: orbax saves it as is.


def parameter_norms(trainable):
    """Frobenius norms of what training moves: `lora_norm` (all LoRA factors), and one per
    adapter part, `projector_norm` and `new_token_embedding_norm`. They trace when the
    behavioural pathway switches on (README, Results: the projector grows most in the runs
    that read the behavioural tokens)."""
    groups = {"lora": trainable.get("lora", {}), **trainable.get(rsllm.ADAPTER, {})}
    return {
        f"{name}_norm": optax.tree.norm(tree)
        for name, tree in groups.items() if jax.tree.leaves(tree)
    }


def make_loss_fn(model, train_config, with_target_tower):
    c = train_config

    def loss_fn(trainable, frozen, batch, item_table, rng):
        outputs = _apply(model, trainable, frozen, batch, item_table, rng, with_target_tower)
        return losses.rsllm_loss(outputs, batch, c.gamma, c.beta, c.temperature,
                                 c.symmetric_infonce)

    return loss_fn


def _apply(model, trainable, frozen, batch, item_table, rng, with_target_tower):
    rngs = {"dropout": rng} if not model.deterministic else {}
    return model.apply({**frozen, **trainable}, batch, item_table,
                       with_target_tower=with_target_tower, rngs=rngs)


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def make_train_step(model, optimizer, train_config, with_target_tower=True):
    """(state, frozen, micro_batches, item_table) → (state, metrics); jit it with the state
    donated. `micro_batches` holds every batch array with a leading axis of k micro-batches,
    (k, B, ...): one optimiser update over their k·B rows (module docstring)."""
    c = train_config
    loss_fn = make_loss_fn(model, c, with_target_tower)

    def full_batch_step(trainable, frozen, micro_batches, item_table, rngs):
        """k = 1: the value and gradient of Eq. 5 directly."""
        batch = jax.tree.map(lambda x: x[0], micro_batches)
        (_, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, batch,
                                                                      item_table, rngs[0])
        return parts, grads

    def nip_sum(trainable, frozen, batch, item_table, rng, answer_tokens, cotangents):
        """The micro-batch's share of L_NIP (its token sum over the whole batch's count),
        plus <dL_contrastive/dg, g> for the cached tower gradients `cotangents`."""
        outputs = _apply(model, trainable, frozen, batch, item_table, rng, with_target_tower
                         and cotangents is not None)
        total, _ = losses.nip_loss_sum(outputs["nip_logits"], batch["nip_labels"],
                                       batch["nip_mask"])
        surrogate = total / answer_tokens
        if cotangents is not None:
            surrogate += sum(
                jnp.vdot(cotangents[k], outputs[k].astype(jnp.float32))
                for k in losses.TOWER_OUTPUTS)
        return surrogate, total

    def accumulated_step(trainable, frozen, micro_batches, item_table, rngs):
        """k > 1: NIP by accumulation, the contrastive terms by gradient caching."""
        answer_tokens = jnp.maximum(micro_batches["nip_mask"].sum(), 1).astype(jnp.float32)
        k, rows = micro_batches["target_item"].shape
        parts, cotangents = {}, None
        if with_target_tower:

            def represent(_, xs):  # Pass 1: no gradients, nothing kept but the towers.
                batch, rng = xs
                outputs = _apply(model, trainable, frozen, batch, item_table, rng, True)
                return None, {key: outputs[key].astype(jnp.float32) for key in losses.TOWER_OUTPUTS}

            _, towers = jax.lax.scan(represent, None, (micro_batches, rngs))
            flat = lambda x: x.reshape((k * rows, ) + x.shape[2:])  # noqa: E731
            contrastive = lambda t: losses.contrastive_loss(  # noqa: E731
                t, flat(micro_batches["target_item"]), flat(micro_batches["example_mask"]), c.gamma,
                c.beta, c.temperature, c.symmetric_infonce)
            (contrastive_total,
             parts), tower_grads = jax.value_and_grad(contrastive,
                                                      has_aux=True)(jax.tree.map(flat, towers))
            cotangents = jax.tree.map(lambda g: g.reshape((k, rows) + g.shape[1:]), tower_grads)

        def accumulate(grads, xs):  # Pass 2: forward and backward per micro-batch.
            batch, rng, cotangent = xs
            (_, total), g = jax.value_and_grad(nip_sum,
                                               has_aux=True)(trainable, frozen, batch, item_table,
                                                             rng, answer_tokens, cotangent)
            return _tree_add(grads, g), total

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        grads, nip_totals = jax.lax.scan(accumulate, zeros, (micro_batches, rngs, cotangents))
        nip = nip_totals.sum() / answer_tokens
        total = nip + (contrastive_total if with_target_tower else 0.0)
        return dict(parts, nip=nip, total=total), grads

    def train_step(state, frozen, micro_batches, item_table):
        k = micro_batches["tokens"].shape[0]
        rng, step_rng = jax.random.split(state.rng)
        rngs = jax.random.split(step_rng, k)  # Pass 1 and 2 of a micro-batch share its key.
        step = full_batch_step if k == 1 else accumulated_step
        parts, grads = step(state.trainable, frozen, micro_batches, item_table, rngs)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = dict(parts, grad_norm=optax.tree.norm(grads), **parameter_norms(trainable))
        return state.replace(step=state.step + k, trainable=trainable, opt_state=opt_state,
                             rng=rng), metrics

    return train_step


def make_eval_step(model, train_config, with_target_tower=True):
    """(trainable, frozen, batch, item_table) → loss parts of one (B, ...) batch, without
    dropout."""
    loss_fn = make_loss_fn(model.clone(deterministic=True), train_config, with_target_tower)

    def eval_step(trainable, frozen, batch, item_table):
        return loss_fn(trainable, frozen, batch, item_table, jax.random.key(0))[1]

    return eval_step
