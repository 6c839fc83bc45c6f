"""The `stage1` and `stage2` pipeline steps: two-stage fine-tuning (paper Algorithm 1).

Stage 1 trains on text-ID prompts, stage 2 continues from stage 1's trainable parameters on
hybrid prompts (item formats from config.stage1/stage2, so either stage alone and every
ablation of the paper's Table 4 are configs). Only LoRA, the projector and the new token rows
train; the base Llama is read from config.model and stays frozen.

A stage is built (`build_stage`: model, tokenizer, layout, frozen base, item table, batch
maker, jitted step and eval functions, initial state; no checkpoint is touched) and then run
(`train`). The loop keeps the step number on the host and never waits for the device between
updates: the next update's prompts are tokenized and collated in a background thread
(`config.train.prefetch`), and metrics leave the device only at log, validation and checkpoint
steps, where the NaN check covers every update since the last one.

Checkpoints (checkpoint/resume.py, `<workdir>/<stage>/checkpoints`) hold the train state
(trainable parameters, optimiser state, step, RNG) and the input pipeline's position, every
`checkpoint_every` steps and at the end: a run killed at any point and restarted ends with the
same parameters as one that was not; a damaged newest checkpoint is moved aside and the one
before it resumed. SIGTERM (preemption) saves before exiting. A NaN or infinite loss stops the
run naming the steps; the last good checkpoint stays as it was.
"""

import dataclasses
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from rsllm_jax import config_lists, monitoring, run_paths
from rsllm_jax.checkpoint.resume import RunCheckpointer
from rsllm_jax.data.pipeline import BatchIterator, Prefetch
from rsllm_jax.data.storage import PreparedDataset
from rsllm_jax.evaluation.evaluate import Evaluator
from rsllm_jax.models import rsllm
from rsllm_jax.models.base import load_base_model, restore_like
from rsllm_jax.parallel import layouts, mesh as mesh_lib
from rsllm_jax.prompts import batching, encoding, stages, templates
from rsllm_jax.recommenders.embeddings import load_item_table, preload_table as read_preload
from rsllm_jax.training import flops as flops_lib, optim, sharding, train_step as train_step_lib
from rsllm_jax.training.selection import EpochSelection


@dataclasses.dataclass(frozen=True)
class StageProgram:
    """The compiled side of a stage: optimiser, shardings and the jitted steps."""

    optimizer: Any
    layout: sharding.StageLayout
    step_fn: sharding.ShardedFunction  # (state, frozen, micro_batches, table) → (state, metrics)
    eval_fn: sharding.ShardedFunction  # (trainable, frozen, batch, table) → loss parts
    with_towers: bool


def make_program(model, train_config, total_updates, mesh, rules, seed, example_batch, item_table):
    """The StageProgram of `model` (an RSLLM) under config.train. `example_batch` and
    `item_table` give shapes only (arrays or ShapeDtypeStructs): `build_stage` passes real
    ones, `compile_check` abstract ones for a model it never allocates."""
    optimizer = optim.make_optimizer(train_config, total_updates)
    # Explicit shardings from the logical axes (checked before compiling); host batches become
    # global arrays inside step_fn/eval_fn, the state is donated.
    layout = sharding.make_layout(mesh, rules, model, optimizer, seed, example_batch, item_table)
    with_towers = train_config.gamma > 0 or train_config.beta > 0
    step_fn = sharding.jit_train_step(
        train_step_lib.make_train_step(model, optimizer, train_config, with_towers), layout)
    eval_fn = sharding.jit_eval_step(
        train_step_lib.make_eval_step(model, train_config, with_towers), layout)
    return StageProgram(optimizer, layout, step_fn, eval_fn, with_towers)


@dataclasses.dataclass
class Stage:
    """A stage ready to run: everything built, no checkpoint read or written."""

    name: str
    config: Any
    stage_dir: str
    dataset: PreparedDataset
    item_format: str
    llama_config: Any
    program: StageProgram
    frozen: Any  # {"params": {"llm": base params}} on its shardings
    item_table: jax.Array  # replicated
    train_rows: BatchIterator  # this host's slices of the train batches
    make_batch: Callable  # (rows, step=None) → collated host batch
    state: Any  # the initial TrainState (fresh LoRA, or stage 1's parameters)
    total_steps: int  # micro-batches; an update takes `accumulation` of them
    accumulation: int
    make_evaluator: Callable  # () → an Evaluator of the stage's format and current parameters
    preloaded_iid_rows: bool
    mesh: jax.sharding.Mesh


def build_stage(config, workdir, stage):
    """Builds one stage of the run in `workdir` (see `Stage`)."""
    if stage not in run_paths.STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    stage_config = config[stage]
    mesh, rules = layouts.mesh_from_config(config.mesh)  # Mesh ≠ devices fails here, first.
    dataset = PreparedDataset(run_paths.data_dir(config, workdir))
    catalogue = dataset.catalogue
    llama_config, llama_params, tokenizer = load_base_model(config, catalogue, workdir, mesh, rules)
    first_new = len(tokenizer)
    encoding.add_special_tokens(tokenizer, stages.item_formats(config), catalogue.num_items,
                                config.prompts.iid_tokens)
    num_new = len(tokenizer) - first_new
    item_format = stage_config.item_format
    formats = stages.stage_formats(config, stage)
    item_table = load_item_table(config, workdir, catalogue.num_items, formats)
    preload_table = read_preload(config, workdir, catalogue.num_items) \
        if stages.preloads_iid_rows(config, stage) else None
    item_table = jnp.asarray(item_table)
    model = rsllm.RSLLM(llama_config, num_new_tokens=num_new, first_new_token=first_new,
                        deterministic=config.model.lora_dropout == 0)
    # One encoder per format; validation and the init batch use the stage's own format.
    encoders = {
        fmt: encoding.PromptEncoder(tokenizer, catalogue, fmt, config.prompts.max_length,
                                    config.prompts.iid_tokens, config.prompts.chat_template)
        for fmt in formats
    }
    for format_encoder in encoders.values():  # Train candidates are redrawn: any 20 may meet.
        format_encoder.check_item_lengths(dataset.manifest["num_candidates"])
    encoder = encoders[item_format]
    c = config.train
    buckets = config_lists.ints(config.prompts.length_buckets, "config.prompts.length_buckets")
    slots = dataset.manifest["max_history"] + dataset.manifest["num_candidates"]

    host_batch = c.batch_size // jax.process_count()  # Each host collates its slice.
    train_rows = BatchIterator(dataset, "train", c.batch_size, seed=config.seed,
                               process_index=jax.process_index(), process_count=jax.process_count())
    # Steps count micro-batches; an update takes `accumulation_steps` of them (train_step.py).
    k = c.accumulation_steps
    total_steps = stage_config.epochs * train_rows.steps_per_epoch
    if stage_config.max_steps:
        total_steps = min(total_steps, stage_config.max_steps)
    total_updates = max(total_steps // k, 1)
    total_steps = total_updates * k  # A last incomplete update is not run.

    def make_batch(rows, step=None):
        """Collated prompts of `rows`; with `step`, each example's format follows the stage's
        curriculum (if any)."""
        if step is None or len(formats) == 1:
            return batching.collate(encoder.encode_batch(rows), host_batch, 0, slots, buckets)
        real = np.flatnonzero(rows["mask"])
        own = stages.curriculum_choices(config.seed, step, rows["row_id"][real], total_steps)
        prompts = [(encoder if use_own else encoders[formats[1]]).encode(
            rows["history"][i][:rows["history_len"][i]], rows["candidates"][i], rows["target"][i],
            rows["row_id"][i]) for i, use_own in zip(real, own)]
        return batching.collate(prompts, host_batch, 0, slots, buckets)

    # The first host-sized batch: parameter shapes do not depend on which rows it holds.
    example = make_batch(
        next(
            BatchIterator(dataset, "train", host_batch, seed=config.seed, process_index=0,
                          process_count=1)))
    trainable = mesh_lib.init_sharded(model, jax.random.PRNGKey(config.seed),
                                      {k: jnp.asarray(v)
                                       for k, v in example.items()}, item_table, mesh=mesh,
                                      rules=rules, collections=rsllm.TRAINABLE)
    if preload_table is not None:
        iid_rows = [
            tokenizer.convert_tokens_to_ids(templates.iid_token(i)) - first_new
            for i in range(catalogue.num_items)
        ]
        trainable = rsllm.preload_iid_embeddings(
            trainable, preload_table, iid_rows,
            llama_params["embed_tokens"]["embedding"][:first_new], llama_config)
    if stage == "stage2" and stage_config.init_from_stage1:
        trainable = _restore_final(run_paths.stage_dir(workdir, "stage1"), trainable)
    program = make_program(model, c, total_updates, mesh, rules, config.seed, example, item_table)
    layout = program.layout
    frozen = layout.put_frozen({"params": {"llm": llama_params}})
    item_table = layout.put_replicated(item_table)
    state = sharding.create_state(trainable, program.optimizer, config.seed, layout)

    def make_evaluator():
        return Evaluator(config, dataset, item_format, llama_config, frozen["params"]["llm"],
                         tokenizer, first_new, item_table, trainable=state.trainable)

    return Stage(stage, config, run_paths.stage_dir(workdir, stage), dataset, item_format,
                 llama_config, program, frozen, item_table, train_rows, make_batch, state,
                 total_steps, k, make_evaluator, preload_table is not None, mesh)


@dataclasses.dataclass
class _Update:
    """One update's input, made in the prefetch thread."""

    micro_batches: dict  # (k, host rows, ...) NumPy arrays
    data_state: dict  # the train iterator's position after these rows
    tokens: int  # real tokens of the global batch
    flops: float  # their model FLOPs (flops.py)


class _Interval:
    """The device metrics of the updates since the last check; `check()` takes them off the
    device in one transfer and stops the run if any loss is NaN or infinite."""

    def __init__(self, first_step):
        self.first_step = first_step  # The interval covers steps (first_step, last step].
        self._pending = []

    def add(self, step, metrics):
        self._pending.append((step, metrics))

    def check(self, stage, stage_dir, last_good):
        """Mean metrics of the interval and the last update's; raises FloatingPointError
        naming the first non-finite update and the interval checked."""
        if not self._pending:
            return {}, {}
        values = jax.device_get([m for _, m in self._pending])
        steps = [s for s, _ in self._pending]
        first = self.first_step + 1
        for step, metrics in zip(steps, values):
            loss = float(metrics["total"])
            if not np.isfinite(loss):
                raise FloatingPointError(
                    f"{stage}: the loss is {loss} at step {step} (checked steps [{first}, "
                    f"{steps[-1]}]); stopped without saving, the last good checkpoint is step "
                    f"{last_good} in {stage_dir}")
        mean = {key: float(np.mean([float(m[key]) for m in values])) for key in values[-1]}
        self.first_step, self._pending = steps[-1], []
        return mean, {key: float(v) for key, v in values[-1].items()}


def train(stage):
    """Runs a built stage to its last step (resuming from its checkpoints); returns its metrics
    (validation per epoch, steps, tokens/s)."""
    config, c, name = stage.config, stage.config.train, stage.name
    program, k = stage.program, stage.accumulation
    train_rows, total_steps = stage.train_rows, stage.total_steps
    steps_per_epoch = train_rows.steps_per_epoch
    learning_rate = optim.learning_rate_schedule(c.learning_rate, total_steps // k, c.warmup_ratio,
                                                 c.decay)
    selection = EpochSelection(c.select_by, stage.make_evaluator, config.eval)
    checkpoints = RunCheckpointer(run_paths.checkpoints_dir(stage.stage_dir), name)
    state, history = stage.state, []
    restored, data, progress = checkpoints.restore(program.layout.abstract_state)
    if restored is not None:
        state = restored
        train_rows.set_state(data)
        history = progress["history"]
        logging.info("%s: resumed at step %d (epoch %d)", name, int(state.step), train_rows.epoch)
    step = int(state.step)  # The host's count from here on: the device's is never waited for.
    next_step = step  # The first micro-batch of the next update the prefetcher makes.

    def produce():
        """The next update's micro-batches (runs in the prefetch thread)."""
        nonlocal next_step
        if next_step >= total_steps:
            raise StopIteration
        micro = [stage.make_batch(next(train_rows), next_step + i) for i in range(k)]
        next_step += k
        # Each host holds its slice of the batch: scale its counts to the global batch.
        processes = jax.process_count()
        return _Update(
            batching.stack(micro), train_rows.get_state(),
            sum(int(b["attention_mask"].sum()) for b in micro) * processes,
            sum(
                flops_lib.batch_flops(stage.llama_config, b, program.with_towers,
                                      stage.item_table.shape[1]) for b in micro) * processes)

    def save(data_state, force=False):
        checkpoints.save(step, state, {"history": history}, data_state, force=force)

    def crossed(every):
        """Whether the update that ended at `step` passed a multiple of `every` steps."""
        return step // every > (step - k) // every

    interval = _Interval(step)
    profiler = monitoring.Profiler(monitoring.parse_profile_steps(c.profile_steps),
                                   run_paths.as_path(stage.stage_dir) / "profile")
    tokens_seen, flops_seen, start, last_log, timed = 0, 0.0, time.time(), time.time(), False
    last, train_seconds = {}, 0.0
    with checkpoints, monitoring.MetricWriter(
            stage.stage_dir, resume_step=step if restored is not None else None) as writer, \
            Prefetch(produce, c.prefetch) as batches, \
            monitoring.progress(total_steps, name, initial=step) as bar:
        while step < total_steps:
            update = next(batches)
            profiler.before_update(step + k)
            state, metrics = program.step_fn(state, stage.frozen, update.micro_batches,
                                             stage.item_table)
            step += k
            interval.add(step, metrics)
            profiler.after_update(step, metrics)
            bar.update(k)
            if not timed:  # Rates exclude the first update (its compilation): wait for it.
                jax.block_until_ready(metrics)
                start, timed = time.time(), True
            else:
                tokens_seen += update.tokens
                flops_seen += update.flops
            epoch = (step - k) // steps_per_epoch  # The epoch the update started in.
            epoch_end = crossed(steps_per_epoch) or step == total_steps
            checkpoint = crossed(c.checkpoint_every) or step == total_steps
            preempted = checkpoints.preempted(step)
            if crossed(c.log_every) or epoch_end or checkpoint or preempted \
                    or time.time() - last_log > 60:
                mean, last = interval.check(name, stage.stage_dir, checkpoints.latest_step())
                elapsed = train_seconds = max(time.time() - start, 1e-9)
                mfu = flops_lib.mfu(flops_seen / elapsed,
                                    jax.devices()[0].device_kind, jax.device_count())
                rates = dict(tokens_per_second=tokens_seen / elapsed,
                             tflops_per_second=flops_seen / elapsed / 1e12,
                             learning_rate=float(learning_rate(step // k - 1)))
                if mfu is not None:
                    rates["mfu"] = mfu
                writer.write(step, dict(mean, **rates), "train")
                logging.info("%s: step %d/%d epoch %d %s %.0f tokens/s, %.3g TFLOP/s, MFU %s", name,
                             step, total_steps, epoch,
                             {key: round(v, 4)
                              for key, v in mean.items()}, rates["tokens_per_second"],
                             rates["tflops_per_second"], "n/a" if mfu is None else f"{mfu:.1%}")
                last_log = time.time()
            if epoch_end:
                with batches.paused():  # Validation encodes prompts with the same tokenizer.
                    val = _evaluate(program.eval_fn, state, stage)
                    if selection.needs_answers and "val" in stage.dataset.splits:
                        val.update(selection.answer_metrics(state.trainable))
                history.append(dict(epoch=epoch, step=step, train_loss=last["total"], val=val))
                writer.write(step, val, "val")
                logging.info("%s: epoch %d validation %s", name, epoch, val)
                if selection.is_best(history):
                    _save_checkpoint(run_paths.best_path(stage.stage_dir), state.trainable)
            if checkpoint or preempted:
                save(update.data_state, force=preempted)
            if preempted:
                checkpoints.stop(step)
        profiler.close()
    final, chosen = state.trainable, selection.best(history)
    if chosen is not None and chosen["step"] != step:
        logging.info("%s: keeping epoch %d (best validation %s = %.4f)", name, chosen["epoch"],
                     c.select_by, chosen["val"][selection.metric])
        final = restore_like(run_paths.best_path(stage.stage_dir), state.trainable)
    _save_checkpoint(run_paths.final_path(stage.stage_dir), final)
    return dict(
        stage=name,
        item_format=stage.item_format,
        mesh=dict(stage.mesh.shape),
        select_by=c.select_by,
        selected_epoch=None if chosen is None else chosen["epoch"],
        curriculum_from=config[name].curriculum_from,
        preloaded_iid_embeddings=stage.preloaded_iid_rows,
        steps=step,
        epochs=history,
        # Updates after the first (its compilation), to the last one's end on the device.
        train_seconds=train_seconds,
        tokens_per_second=tokens_seen / max(train_seconds, 1e-9))


def run_stage(config, workdir, stage):
    """Builds and trains one stage; returns its metrics."""
    return train(build_stage(config, workdir, stage))


def _evaluate(eval_fn, state, stage):
    """Mean loss parts over the validation split (weighted by real rows)."""
    if "val" not in stage.dataset.splits:
        return {}
    sums, count = {}, 0
    for rows in BatchIterator(stage.dataset, "val", stage.config.train.batch_size,
                              process_index=jax.process_index(), process_count=jax.process_count()):
        # The parts are means over the global batch: weight them by its real rows, all
        # processes' (this process holds only its slice).
        n = int(mesh_lib.process_sum(int(rows["mask"].sum())))
        parts = eval_fn(state.trainable, stage.frozen, stage.make_batch(rows), stage.item_table)
        for key, value in parts.items():
            sums[key] = sums.get(key, 0.0) + float(value) * n
        count += n
    return {key: value / count for key, value in sums.items()}


def _save_checkpoint(path, trainable):
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, trainable, force=True)
    checkpointer.wait_until_finished()


def _restore_final(stage_dir, like):
    path = run_paths.final_path(stage_dir)
    if not path.exists():
        raise FileNotFoundError(f"{path}: stage 2 starts from stage 1's parameters; run the "
                                "stage1 step first or set config.stage2.init_from_stage1=False")
    return restore_like(path, like)


def run_stage1(config, workdir):
    return run_stage(config, workdir, "stage1")


def run_stage2(config, workdir):
    return run_stage(config, workdir, "stage2")
