"""The `stage1` and `stage2` pipeline steps: two-stage fine-tuning (paper Algorithm 1).

Stage 1 trains on text-ID prompts, stage 2 continues from stage 1's trainable parameters on
hybrid prompts (item formats from config.stage1/stage2, so either stage alone and every
ablation of the paper's Table 4 are configs). Only LoRA, the projector and the new token rows
train; the base Llama is read from config.model and stays frozen.

Checkpoints (orbax CheckpointManager, `<workdir>/<stage>/checkpoints`) hold the train state
(trainable parameters, optimiser state, step, RNG) and the input pipeline's position, every
`checkpoint_every` steps and at the end: a run killed at any point and restarted ends with the
same parameters as one that was not. SIGTERM (preemption) saves before exiting. A NaN or
infinite loss stops the run naming the step; the last good checkpoint stays as it was.
"""

import os
import signal
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from rsllm_jax.data.pipeline import BatchIterator
from rsllm_jax.data.prepare import data_dir
from rsllm_jax.data.storage import PreparedDataset
from rsllm_jax.models import llama, lora as lora_lib, rsllm
from rsllm_jax.parallel import mesh as mesh_lib
from rsllm_jax.prompts import batching, encoding
from rsllm_jax.training import optim, train_step as train_step_lib

PLACEHOLDER_FORMATS = ("hybrid", "behavior", "llara")
STAGES = ("stage1", "stage2")


# --- the base model ---------------------------------------------------------------------------

def load_base_model(config, catalogue, workdir):
    """(LlamaConfig with LoRA, frozen Llama params, tokenizer) from config.model.

    config.model.name: a preset of `models.llama.CONFIGS` (random init, with a SentencePiece
    tokenizer trained on the dataset's text: no download), a `.gguf` file, or a Hugging Face
    Llama directory.
    """
    m = config.model
    overrides = dict(
        dtype=m.dtype, param_dtype=m.param_dtype, scan_layers=m.scan_layers,
        remat_policy=m.remat_policy,
        lora=lora_lib.LoraConfig(rank=m.lora_rank, alpha=m.lora_alpha, dropout=m.lora_dropout,
                                 targets=tuple(t.strip() for t in m.lora_targets.split(","))))
    if m.name in llama.CONFIGS:
        from rsllm_jax.prompts.demo_tokenizer import train_tokenizer

        tokenizer = train_tokenizer(catalogue, os.path.join(workdir, "tokenizer"),
                                    m.demo_vocab_size)
        llama_config = llama.get_config(
            m.name, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=0, **overrides)
        base = llama.Llama(llama_config.replace(lora=None))
        params = mesh_lib.init_sharded(base, jax.random.PRNGKey(m.init_seed),
                                       jnp.ones((1, 1), jnp.int32))["params"]
    elif m.name.endswith(".gguf"):
        from rsllm_jax.checkpoint import gguf

        llama_config, params = gguf.load_gguf(m.name, **overrides)
        tokenizer = gguf.tokenizer_from_gguf(m.name)
    else:
        from rsllm_jax.checkpoint import hf

        llama_config, params = hf.load_hf(m.name, **overrides)
        tokenizer = hf.load_tokenizer(m.name)
    return llama_config, params, tokenizer


def item_formats(config):
    return [config.stage1.item_format, config.stage2.item_format]


def load_item_table(config, workdir, num_items, item_format):
    """The recommender's item-embedding table (num_items + 1, d); zeros when the format has
    no behavioural tokens (the table is then never read)."""
    if item_format not in PLACEHOLDER_FORMATS:
        return np.zeros((num_items + 1, config.rec.hidden_size), np.float32)
    from rsllm_jax.recommenders import load_item_embeddings
    from rsllm_jax.recommenders.train import embeddings_path

    path = config.prompts.item_embeddings or embeddings_path(workdir)
    table, _ = load_item_embeddings(path, num_items)
    return np.asarray(table, np.float32)


# --- one stage -----------------------------------------------------------------------------

class _Preemption:
    """Turns SIGTERM into a flag the loop checks after each step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # Not the main thread: no handler, the run just ends on SIGTERM.
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _to_device(batch):
    return {k: jnp.asarray(v) for k, v in batch.items()}


def run_stage(config, workdir, stage):
    """Trains one stage; returns its metrics (losses per epoch, steps, tokens/s)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    stage_config = config[stage]
    stage_dir = os.path.join(workdir, stage)
    dataset = PreparedDataset(data_dir(config, workdir))
    catalogue = dataset.catalogue
    llama_config, llama_params, tokenizer = load_base_model(config, catalogue, workdir)
    first_new = len(tokenizer)
    encoding.add_special_tokens(tokenizer, item_formats(config), catalogue.num_items,
                                config.prompts.iid_tokens)
    num_new = len(tokenizer) - first_new
    item_format = stage_config.item_format
    item_table = jnp.asarray(load_item_table(config, workdir, catalogue.num_items, item_format))
    model = rsllm.RSLLM(llama_config, num_new_tokens=num_new, first_new_token=first_new,
                        deterministic=config.model.lora_dropout == 0)
    encoder = encoding.PromptEncoder(tokenizer, catalogue, item_format, config.prompts.max_length,
                                     config.prompts.iid_tokens)
    c = config.train
    buckets = tuple(int(b) for b in config.prompts.length_buckets.split(","))
    slots = dataset.manifest["max_history"] + dataset.manifest["num_candidates"]

    def make_batch(rows):
        return batching.collate(encoder.encode_batch(rows), c.batch_size, 0, slots, buckets)

    train_rows = BatchIterator(dataset, "train", c.batch_size, seed=config.seed,
                               process_index=jax.process_index(),
                               process_count=jax.process_count())
    with_towers = c.gamma > 0 or c.beta > 0
    total_steps = stage_config.epochs * train_rows.steps_per_epoch
    if stage_config.max_steps:
        total_steps = min(total_steps, stage_config.max_steps)
    total_updates = max(total_steps // c.accumulation_steps, 1)
    optimizer = optim.make_optimizer(c, total_updates)

    frozen = {"params": {"llm": llama_params}}
    example = make_batch(next(BatchIterator(dataset, "train", c.batch_size, seed=config.seed,
                                            process_index=0, process_count=1)))
    trainable = mesh_lib.init_sharded(model, jax.random.PRNGKey(config.seed), _to_device(example),
                                      item_table, collections=rsllm.TRAINABLE)
    if stage == "stage2" and stage_config.init_from_stage1:
        trainable = _restore_final(os.path.join(workdir, "stage1"), trainable)
    state = train_step_lib.create_state(trainable, optimizer, config.seed)
    step_fn = jax.jit(train_step_lib.make_train_step(model, optimizer, c, with_towers),
                      donate_argnums=0)
    eval_fn = jax.jit(train_step_lib.make_eval_step(model, c, with_towers))

    manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(stage_dir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
    history = []
    if manager.latest_step() is not None:
        restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, state)),
            data=ocp.args.JsonRestore(), progress=ocp.args.JsonRestore()))
        state = restored.state
        train_rows.set_state(restored.data)
        history = restored.progress["history"]
        logging.info("%s: resumed at step %d (epoch %d)", stage, int(state.step),
                     train_rows.epoch)

    def save(force=False):
        manager.save(int(state.step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(train_rows.get_state()),
            progress=ocp.args.JsonSave({"history": history})), force=force)

    tokens_seen, start, last_log = 0, time.time(), time.time()
    with _Preemption() as preemption:
        while int(state.step) < total_steps:
            epoch = int(state.step) // train_rows.steps_per_epoch
            batch = make_batch(next(train_rows))
            state, metrics = step_fn(state, frozen, _to_device(batch), item_table)
            step = int(state.step)
            loss = float(metrics["total"])
            if not np.isfinite(loss):
                raise FloatingPointError(
                    f"{stage}: the loss is {loss} at step {step}; stopped without saving, the "
                    f"last good checkpoint is step {manager.latest_step()} in {stage_dir}")
            if tokens_seen == 0:  # Rates exclude the first step's compilation.
                start = time.time()
            tokens_seen += int(batch["attention_mask"].sum())
            if step % c.log_every == 0 or time.time() - last_log > 60:
                elapsed = time.time() - start
                logging.info("%s: step %d/%d epoch %d %s %.0f tokens/s", stage, step,
                             total_steps, epoch, {k: round(float(v), 4)
                                                  for k, v in metrics.items()},
                             tokens_seen / max(elapsed, 1e-9))
                last_log = time.time()
            if step % train_rows.steps_per_epoch == 0 or step == total_steps:
                history.append(dict(epoch=epoch, train_loss=loss,
                                    val=_evaluate(eval_fn, state, frozen, dataset, make_batch,
                                                  item_table, c.batch_size)))
                logging.info("%s: epoch %d validation %s", stage, epoch, history[-1]["val"])
            if step % c.checkpoint_every == 0 or step == total_steps:
                save()
            if preemption.requested:
                save(force=True)
                manager.wait_until_finished()
                raise SystemExit(f"{stage}: SIGTERM received, saved step {step}; rerun to "
                                 "resume")
    manager.wait_until_finished()
    _save_final(stage_dir, state.trainable)
    return dict(stage=stage, item_format=item_format, steps=int(state.step), epochs=history,
                tokens_per_second=tokens_seen / max(time.time() - start, 1e-9))


def _evaluate(eval_fn, state, frozen, dataset, make_batch, item_table, batch_size):
    """Mean loss parts over the validation split (weighted by real rows)."""
    if "val" not in dataset.splits:
        return {}
    sums, count = {}, 0
    for rows in BatchIterator(dataset, "val", batch_size, process_index=jax.process_index(),
                              process_count=jax.process_count()):
        n = int(rows["mask"].sum())
        parts = eval_fn(state.trainable, frozen, _to_device(make_batch(rows)), item_table)
        for key, value in parts.items():
            sums[key] = sums.get(key, 0.0) + float(value) * n
        count += n
    return {key: value / count for key, value in sums.items()}


def _final_path(stage_dir):
    return os.path.abspath(os.path.join(stage_dir, "final"))


def _save_final(stage_dir, trainable):
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(_final_path(stage_dir), trainable, force=True)
    checkpointer.wait_until_finished()


def _restore_final(stage_dir, like):
    path = _final_path(stage_dir)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: stage 2 starts from stage 1's parameters; run the "
                                "stage1 step first or set config.stage2.init_from_stage1=False")
    return ocp.StandardCheckpointer().restore(
        path, jax.tree.map(ocp.utils.to_shape_dtype_struct, like))


def run_stage1(config, workdir):
    return run_stage(config, workdir, "stage1")


def run_stage2(config, workdir):
    return run_stage(config, workdir, "stage2")
