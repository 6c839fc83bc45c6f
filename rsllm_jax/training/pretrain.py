"""The `pretrain` step: full-parameter training of the base LLM on the task's text prompts.

A real base LLM arrives pre-trained: it reads a prompt and can copy a title out of it. The
demo's tiny random-init Llama can do neither, and LoRA on a frozen random network does not
learn to within minutes (README, Results: the same title for every row, HitRatio@1 at chance,
after hundreds of LoRA steps). This step trains every parameter of the base for
`config.pretrain.steps` steps on the train split's prompts in the `text` item format (titles
only, so the vocabulary is the base's own) with the next-item loss of Eq. 2 on the answer's
tokens: TALLRec-style full fine-tuning. The LLM stages and `eval` then read the result as
their frozen base (`models/base.py`). Off by default (steps = 0): a pre-trained base
does not need it.

The result is also written as a Hugging Face Llama directory, `<workdir>/pretrain/hf`, which
other runs can name as their base (the experiments command shares one pre-trained base
between all its rows that way).

Resumable like the stages: an orbax checkpoint of (params, optimiser state, step) and the
input pipeline's position every `checkpoint_every` steps and on SIGTERM
(checkpoint/resume.py); a NaN loss stops the step naming it. Sharded like the stages' frozen
base on config.mesh, each process feeding its slice of every batch.
"""

import dataclasses
import os
import time

from absl import logging
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

from rsllm_jax.checkpoint.resume import RunCheckpointer
from rsllm_jax.data.pipeline import BatchIterator, Prefetch
from rsllm_jax.data.storage import PreparedDataset
from rsllm_jax import config_lists, monitoring, run_paths
from rsllm_jax.models import base, llama
from rsllm_jax.parallel import layouts, mesh as mesh_lib
from rsllm_jax.prompts import batching, encoding
from rsllm_jax.training import losses, optim, sharding

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
                          attention_mask=batch["attention_mask"], logits_at=batch["nip_positions"])
        return losses.nip_loss(out.logits, batch["nip_labels"], batch["nip_mask"])

    return loss_fn


def make_train_step(model, optimizer, layout=None):
    """A jitted (params, opt_state, batch) → (params, opt_state, loss), state donated. With a
    `Layout`, every argument and result has its explicit sharding on the layout's mesh."""
    loss_fn = make_loss_fn(model)

    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    if layout is None:
        return jax.jit(train_step, donate_argnums=(0, 1))
    jitted = jax.jit(train_step, donate_argnums=(0, 1),
                     in_shardings=(layout.params, layout.opt_state, layout.batch),
                     out_shardings=(layout.params, layout.opt_state, layout.replicated))

    def sharded_step(params, opt_state, batch):
        with mesh_lib.use_mesh(layout.mesh, layout.rules):  # Activation constraints need it.
            return jitted(params, opt_state, mesh_lib.global_batch(batch, layout.batch))

    return sharded_step


@dataclasses.dataclass(frozen=True)
class Layout:
    """The shardings of full-parameter training on a mesh: the base's parameters by their
    logical axes (as the stages' frozen base), Adam's moments like their parameters, the batch
    split over the batch axes (every process feeding its slice)."""

    mesh: jax.sharding.Mesh
    rules: object
    params: object
    opt_state: object

    @property
    def batch(self):
        return mesh_lib.batch_sharding(self.mesh, self.rules)

    @property
    def replicated(self):
        return mesh_lib.replicated(self.mesh)


def make_layout(mesh, rules, llama_config, optimizer, batch_size):
    """The `Layout` of training `llama_config`'s parameters with `optimizer`, checked."""
    layouts.validate_model(mesh, rules, llama_config, batch_size)
    boxed = sharding.boxed_base(llama_config)["params"]["llm"]
    return Layout(mesh, rules, mesh_lib.logical_shardings(boxed, mesh, rules),
                  mesh_lib.logical_shardings(jax.eval_shape(optimizer.init, boxed), mesh, rules))


def _batch_arrays(batch):
    keys = ("tokens", "attention_mask", "nip_positions", "nip_labels", "nip_mask")
    return {key: np.asarray(batch[key]) for key in keys}


def run_step(config, workdir):
    """The pipeline's `pretrain` step; returns its metrics (losses, steps, tokens/s)."""
    p = config.pretrain
    if p.steps <= 0:
        return dict(steps=0)
    dataset = PreparedDataset(run_paths.data_dir(config, workdir))
    catalogue = dataset.catalogue
    # The stages' mesh: on several processes each feeds its slice of every batch.
    mesh, rules = layouts.mesh_from_config(config.mesh)
    llama_config, params, tokenizer = base.load_base_model(config, catalogue, workdir, mesh, rules,
                                                           pretrained=False)
    model = llama.Llama(llama_config.replace(lora=None))
    encoder = encoding.PromptEncoder(tokenizer, catalogue, ITEM_FORMAT, config.prompts.max_length,
                                     config.prompts.iid_tokens, config.prompts.chat_template)
    encoder.check_item_lengths(dataset.manifest["num_candidates"])
    buckets = config_lists.ints(config.prompts.length_buckets, "config.prompts.length_buckets")
    slots = dataset.manifest["max_history"] + dataset.manifest["num_candidates"]

    def make_batch(rows):
        return _batch_arrays(
            batching.collate(encoder.encode_batch(rows), len(rows["mask"]), 0, slots, buckets))

    optimizer = make_optimizer(p)
    layout = make_layout(mesh, rules, llama_config.replace(lora=None), optimizer, p.batch_size)
    train_step = make_train_step(model, optimizer, layout)
    rows = BatchIterator(dataset, p.split, p.batch_size, seed=config.seed)
    params = jax.device_put(params, layout.params)
    state = dict(params=params, opt_state=jax.jit(optimizer.init,
                                                  out_shardings=layout.opt_state)(params))
    checkpoints = RunCheckpointer(
        run_paths.checkpoints_dir(run_paths.as_path(workdir) / "pretrain"), "pretrain")
    losses_seen, step = [], 0
    restored, data, progress = checkpoints.restore(
        jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
    if restored is not None:
        state, step, losses_seen = restored, progress["step"], progress["losses"]
        rows.set_state(data)
        logging.info("pretrain: resumed at step %d", step)

    params, opt_state = state["params"], state["opt_state"]

    # The losses since the last check stay on the device; they are read (and checked for NaN)
    # only at log, checkpoint and preemption steps, so the host does not wait for each step.
    pending = []

    def check():
        values = [float(v) for v in jax.device_get(pending)]
        first = step - len(values) + 1
        for i, loss in enumerate(values):
            if not np.isfinite(loss):
                last_good = checkpoints.latest_step()
                raise FloatingPointError(
                    f"pretrain: the loss is {loss} at step {first + i} (checked steps [{first}, "
                    f"{step}]); stopped without saving, the last good checkpoint is " +
                    (f"step {last_good}" if last_good is not None else "none yet") +
                    f" in {run_paths.as_path(workdir) / 'pretrain'}")
        losses_seen.extend(round(loss, 6) for loss in values)
        pending.clear()
        return values[-1] if values else None

    def save(data_state, force=False):
        checkpoints.save(step, dict(params=params, opt_state=opt_state),
                         {"step": step, "losses": losses_seen}, data_state, force=force)

    def produce():
        """The next batch and the input position after it (runs in the prefetch thread)."""
        batch = make_batch(next(rows))
        return batch, rows.get_state()

    tokens_seen, start = 0, None
    writer = monitoring.MetricWriter(
        run_paths.as_path(workdir) / "pretrain", resume_step=step if restored is not None else None)
    with checkpoints, writer, Prefetch(produce, config.train.prefetch) as batches, \
            monitoring.progress(p.steps, "pretrain", initial=step) as bar:
        while step < p.steps:
            batch, data_state = next(batches)
            params, opt_state, loss = train_step(params, opt_state, batch)
            pending.append(loss)
            step += 1
            bar.update(1)
            if start is None:  # The rate excludes the first step (its compilation).
                jax.block_until_ready(loss)
                start = time.time()
            else:  # This host's slice of the batch, scaled to the global batch.
                tokens_seen += int(batch["attention_mask"].sum()) * jax.process_count()
            if step % config.train.log_every == 0:
                loss = check()
                rate = tokens_seen / max(time.time() - start, 1e-9)
                writer.write(step, dict(loss=loss, tokens_per_second=rate), "train")
                logging.info("pretrain: step %d/%d loss %.4f, %.0f tokens/s", step, p.steps, loss,
                             rate)
            if step % p.checkpoint_every == 0 or step == p.steps:
                check()
                save(data_state)
            if checkpoints.preempted(step):
                check()
                save(data_state, force=True)
                checkpoints.stop(step)
        check()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(run_paths.pretrained_path(workdir), params, force=True)
    checkpointer.wait_until_finished()
    # The same base as a Hugging Face Llama directory with its tokenizer: any run can start from
    # it (`--config.model.name=<workdir>/pretrain/hf --config.pretrain.steps=0`), and so can
    # transformers.
    from rsllm_jax.checkpoint import hf  # pylint: disable=g-import-not-at-top

    hf_path = run_paths.pretrained_hf_path(workdir)
    host_params = mesh_lib.gather_to_host(params)  # Every process takes part.
    if mesh_lib.is_primary():  # transformers writes local folders: a bucket's is uploaded.
        with run_paths.local_folder(hf_path) as local:
            hf.save_hf(local, llama_config.replace(lora=None), host_params, tokenizer=tokenizer,
                       dtype="float32")
    val_loss = _validation_loss(make_loss_fn(model), layout, params, dataset, make_batch,
                                p.batch_size)
    if val_loss is not None:
        with monitoring.MetricWriter(run_paths.as_path(workdir) / "pretrain",
                                     resume_step=step) as writer:
            writer.write(step, dict(loss=val_loss), "val")
    tail = losses_seen[-max(len(losses_seen) // 10, 1):]
    return dict(steps=step, item_format=ITEM_FORMAT, first_loss=losses_seen[0],
                last_loss=float(np.mean(tail)), val_loss=val_loss,
                tokens_per_second=tokens_seen / max(time.time() - (start or time.time()), 1e-9),
                path=os.fspath(run_paths.pretrained_path(workdir)), hf_path=os.fspath(hf_path))


def _validation_loss(loss_fn, layout, params, dataset, make_batch, batch_size):
    """The next-item loss over the val split (weighted by real rows); None without one."""
    if "val" not in dataset.splits:
        return None
    loss_fn = jax.jit(loss_fn, in_shardings=(layout.params, layout.batch),
                      out_shardings=layout.replicated)
    total, count = 0.0, 0
    for rows in BatchIterator(dataset, "val", batch_size):  # This process's slice.
        n = int(mesh_lib.process_sum(int(rows["mask"].sum())))  # Real rows of the global batch.
        with mesh_lib.use_mesh(layout.mesh, layout.rules):
            loss = loss_fn(params, mesh_lib.global_batch(make_batch(rows), layout.batch))
        total += float(loss) * n
        count += n
    return total / max(count, 1)
