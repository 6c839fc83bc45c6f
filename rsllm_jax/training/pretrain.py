"""The `pretrain` step: full-parameter training of the base LLM on the task's text prompts.

A real base LLM arrives pre-trained: it reads a prompt and can copy a title out of it. The
demo's tiny random-init Llama can do neither, and LoRA on a frozen random network does not
learn to within minutes (README, Results: the same title for every row, HitRatio@1 at chance,
after hundreds of LoRA steps). This step trains every parameter of the base for
`config.pretrain.steps` steps on the train split's prompts in the `text` item format (titles
only, so the vocabulary is the base's own) with the next-item loss of Eq. 2 on the answer's
tokens: TALLRec-style full fine-tuning. The LLM stages and `eval` then read the result as
their frozen base (`trainer.load_base_model`). Off by default (steps = 0): a pre-trained base
does not need it.

The result is also written as a Hugging Face Llama directory, `<workdir>/pretrain/hf`, which
other runs can name as their base (the experiments command shares one pre-trained base
between all its rows that way).

Resumable like the stages: an orbax checkpoint of (params, optimiser state, step) and the
input pipeline's position every `checkpoint_every` steps; a NaN loss stops the step naming it.
"""

import functools
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from rsllm_jax.checkpoint.resume import restore_newest
from rsllm_jax.data.pipeline import BatchIterator
from rsllm_jax.data.prepare import data_dir
from rsllm_jax.data.storage import PreparedDataset
from rsllm_jax.models import llama
from rsllm_jax.prompts import batching, encoding
from rsllm_jax.training import losses, optim, trainer

ITEM_FORMAT = "text"  # The only format that adds no token to the base's vocabulary.


def make_optimizer(pretrain_config):
    """AdamW with linear warm-up then cosine decay, gradients clipped at global norm 1."""
    p = pretrain_config
    schedule = optim.learning_rate_schedule(p.learning_rate, p.steps, p.warmup_ratio, "cosine")
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, weight_decay=p.weight_decay))


def make_loss_fn(model):
    """(params, batch) → the next-item loss (Eq. 2) over the answer tokens."""

    def loss_fn(params, batch):
        out = model.apply({"params": params}, batch["tokens"],
                          attention_mask=batch["attention_mask"],
                          logits_at=batch["nip_positions"])
        return losses.nip_loss(out.logits, batch["nip_labels"], batch["nip_mask"])

    return loss_fn


def make_train_step(model, optimizer):
    """A jitted (params, opt_state, batch) → (params, opt_state, loss), state donated."""
    loss_fn = make_loss_fn(model)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


def _batch_arrays(batch):
    keys = ("tokens", "attention_mask", "nip_positions", "nip_labels", "nip_mask")
    return {key: jnp.asarray(batch[key]) for key in keys}


def run_step(config, workdir):
    """The pipeline's `pretrain` step; returns its metrics (losses, steps, tokens/s)."""
    p = config.pretrain
    if p.steps <= 0:
        return dict(steps=0)
    dataset = PreparedDataset(data_dir(config, workdir))
    catalogue = dataset.catalogue
    llama_config, params, tokenizer = trainer.load_base_model(config, catalogue, workdir,
                                                              pretrained=False)
    model = llama.Llama(llama_config.replace(lora=None))
    encoder = encoding.PromptEncoder(tokenizer, catalogue, ITEM_FORMAT, config.prompts.max_length,
                                     config.prompts.iid_tokens, config.prompts.chat_template)
    encoder.check_item_lengths(dataset.manifest["num_candidates"])
    buckets = tuple(int(b) for b in config.prompts.length_buckets.split(","))
    slots = dataset.manifest["max_history"] + dataset.manifest["num_candidates"]

    def make_batch(rows):
        return _batch_arrays(batching.collate(encoder.encode_batch(rows), p.batch_size, 0, slots,
                                              buckets))

    optimizer = make_optimizer(p)
    train_step = make_train_step(model, optimizer)
    rows = BatchIterator(dataset, p.split, p.batch_size, seed=config.seed, process_index=0,
                         process_count=1)
    state = dict(params=params, opt_state=optimizer.init(params))
    manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "pretrain", "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
    losses_seen, step = [], 0
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    _, restored = restore_newest(manager, lambda saved: manager.restore(
        saved, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                       data=ocp.args.JsonRestore(),
                                       progress=ocp.args.JsonRestore())), "pretrain")
    if restored is not None:
        state, step = restored.state, restored.progress["step"]
        rows.set_state(restored.data)
        losses_seen = restored.progress["losses"]
        logging.info("pretrain: resumed at step %d", step)

    params, opt_state = state["params"], state["opt_state"]
    tokens_seen, start = 0, None
    while step < p.steps:
        batch = make_batch(next(rows))
        params, opt_state, loss = train_step(params, opt_state, batch)
        step += 1
        loss = float(loss)
        if not np.isfinite(loss):
            raise FloatingPointError(
                f"pretrain: the loss is {loss} at step {step}; stopped without saving, the last "
                f"good checkpoint is step {manager.latest_step()} in {workdir}/pretrain")
        losses_seen.append(round(loss, 6))
        if start is None:  # The rate excludes the first step (its compilation).
            start = time.time()
        else:
            tokens_seen += int(batch["attention_mask"].sum())
        if step % config.train.log_every == 0:
            logging.info("pretrain: step %d/%d loss %.4f", step, p.steps, loss)
        if step % p.checkpoint_every == 0 or step == p.steps:
            manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(dict(params=params, opt_state=opt_state)),
                data=ocp.args.JsonSave(rows.get_state()),
                progress=ocp.args.JsonSave({"step": step, "losses": losses_seen})))
    manager.wait_until_finished()
    manager.close()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(trainer.pretrained_path(workdir), params, force=True)
    checkpointer.wait_until_finished()
    # The same base as a Hugging Face Llama directory with its tokenizer: any run can start from
    # it (`--config.model.name=<workdir>/pretrain/hf --config.pretrain.steps=0`), and so can
    # transformers.
    from rsllm_jax.checkpoint import hf  # pylint: disable=g-import-not-at-top

    hf_path = os.path.abspath(os.path.join(workdir, "pretrain", "hf"))
    hf.save_hf(hf_path, llama_config.replace(lora=None), params, tokenizer=tokenizer,
               dtype="float32")
    val_loss = _validation_loss(make_loss_fn(model), params, dataset, make_batch, p.batch_size)
    tail = losses_seen[-max(len(losses_seen) // 10, 1):]
    return dict(steps=step, item_format=ITEM_FORMAT, first_loss=losses_seen[0],
                last_loss=float(np.mean(tail)), val_loss=val_loss,
                tokens_per_second=tokens_seen / max(time.time() - (start or time.time()), 1e-9),
                path=trainer.pretrained_path(workdir), hf_path=hf_path)


def _validation_loss(loss_fn, params, dataset, make_batch, batch_size):
    """The next-item loss over the val split (weighted by real rows); None without one."""
    if "val" not in dataset.splits:
        return None
    loss_fn = jax.jit(loss_fn)
    total, count = 0.0, 0
    for rows in BatchIterator(dataset, "val", batch_size, process_index=0, process_count=1):
        n = int(rows["mask"].sum())
        total += float(loss_fn(params, make_batch(rows))) * n
        count += n
    return total / max(count, 1)
