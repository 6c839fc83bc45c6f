"""The optimiser of the LLM stages: Adam with warm-up and weight decay (paper §5.1).

Paper: Adam, lr 1e-5, warm-up over the first 10 % of steps, weight decay 1e-3 (decoupled,
AdamW, as Hugging Face's trainer applies it). LLaRA's scripts: linear warm-up over 5 % then
cosine decay, with far larger LoRA learning rates; both are named presets in configs/base.py.
Gradients are clipped by global norm. `projector_lr_scale` trains the projector (the
behavioural tokens' pathway) at a multiple of the schedule and everything else at the schedule
itself. The paper's batch of 256 is `accumulation_steps` micro-batches of `batch_size`, which
the train step turns into one update (train_step.py: gradient accumulation, with gradient
caching for the contrastive terms).
"""

import jax
import optax


def learning_rate_schedule(learning_rate, total_steps, warmup_ratio, decay):
    """Linear warm-up to `learning_rate`, then `decay`: constant, linear or cosine to 0."""
    warmup = max(int(round(warmup_ratio * total_steps)), 1)
    rest = max(total_steps - warmup, 1)
    after = {
        "constant": optax.constant_schedule(learning_rate),
        "linear": optax.linear_schedule(learning_rate, 0.0, rest),
        "cosine": optax.cosine_decay_schedule(learning_rate, rest)
    }
    if decay not in after:
        raise ValueError(f"unknown decay {decay!r}; expected one of {sorted(after)}")
    return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup), after[decay]],
                                [warmup])


def projector_leaves(params):
    """A tree like `params` that is True at the projector's leaves ("adapter"/"projector")."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(getattr(key, "key", None) == "projector" for key in path), params)


def make_optimizer(train_config, total_steps):
    """optax transformation from config.train (total_steps counts optimiser updates)."""
    c = train_config
    if not c.projector_lr_scale > 0:
        raise ValueError(f"config.train.projector_lr_scale must be > 0, got {c.projector_lr_scale}")
    schedule = learning_rate_schedule(c.learning_rate, total_steps, c.warmup_ratio, c.decay)
    transforms = [
        optax.clip_by_global_norm(c.grad_clip) if c.grad_clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=0.9, b2=0.999, weight_decay=c.weight_decay)
    ]
    if c.projector_lr_scale != 1:
        # AdamW's update, decay included, is proportional to the learning rate: scaling the
        # projector's update is training it at projector_lr_scale × the schedule. Only then in
        # the chain, so that the optimiser state of every other run keeps its structure.
        transforms.append(optax.masked(optax.scale(c.projector_lr_scale), projector_leaves))
    return optax.chain(*transforms)
