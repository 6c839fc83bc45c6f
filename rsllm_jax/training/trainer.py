"""The `stage1` and `stage2` pipeline steps: two-stage fine-tuning (paper Algorithm 1).

Stage 1 trains on text-ID prompts, stage 2 continues from stage 1's trainable parameters on
hybrid prompts (item formats from config.stage1/stage2, so either stage alone and every
ablation of the paper's Table 4 are configs). Only LoRA, the projector and the new token rows
train; the base Llama is read from config.model and stays frozen.

Checkpoints (orbax CheckpointManager, `<workdir>/<stage>/checkpoints`) hold the train state
(trainable parameters, optimiser state, step, RNG) and the input pipeline's position, every
`checkpoint_every` steps and at the end: a run killed at any point and restarted ends with the
same parameters as one that was not; a damaged newest checkpoint is moved aside and the one
before it resumed (checkpoint/resume.py). SIGTERM (preemption) saves before exiting. A NaN or
infinite loss stops the run naming the step; the last good checkpoint stays as it was.
"""

import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from rsllm_jax import run_paths
from rsllm_jax.checkpoint.resume import RunCheckpointer
from rsllm_jax.data.pipeline import BatchIterator
from rsllm_jax.data.storage import PreparedDataset
from rsllm_jax.models import rsllm
from rsllm_jax.models.base import load_base_model, restore_like
from rsllm_jax.parallel import layouts, mesh as mesh_lib
from rsllm_jax.prompts import batching, encoding, stages, templates
from rsllm_jax.recommenders.embeddings import load_item_table, preload_table as read_preload
from rsllm_jax.training import flops as flops_lib, optim, sharding, train_step as train_step_lib

def _to_device(batch):
    return {k: jnp.asarray(v) for k, v in batch.items()}


def run_stage(config, workdir, stage):
    """Trains one stage; returns its metrics (losses per epoch, steps, tokens/s)."""
    if stage not in run_paths.STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    stage_config = config[stage]
    stage_dir = run_paths.stage_dir(workdir, stage)
    mesh, rules = layouts.mesh_from_config(config.mesh)  # Mesh ≠ devices fails here, first.
    dataset = PreparedDataset(run_paths.data_dir(config, workdir))
    catalogue = dataset.catalogue
    llama_config, llama_params, tokenizer = load_base_model(config, catalogue, workdir, mesh,
                                                            rules)
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
    encoders = {fmt: encoding.PromptEncoder(tokenizer, catalogue, fmt, config.prompts.max_length,
                                            config.prompts.iid_tokens,
                                            config.prompts.chat_template) for fmt in formats}
    for format_encoder in encoders.values():  # Train candidates are redrawn: any 20 may meet.
        format_encoder.check_item_lengths(dataset.manifest["num_candidates"])
    encoder = encoders[item_format]
    c = config.train
    buckets = tuple(int(b) for b in config.prompts.length_buckets.split(","))
    slots = dataset.manifest["max_history"] + dataset.manifest["num_candidates"]

    host_batch = c.batch_size // jax.process_count()  # Each host collates its slice.
    train_rows = BatchIterator(dataset, "train", c.batch_size, seed=config.seed,
                               process_index=jax.process_index(),
                               process_count=jax.process_count())
    with_towers = c.gamma > 0 or c.beta > 0
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
            rows["history"][i][:rows["history_len"][i]], rows["candidates"][i],
            rows["target"][i], rows["row_id"][i]) for i, use_own in zip(real, own)]
        return batching.collate(prompts, host_batch, 0, slots, buckets)

    optimizer = optim.make_optimizer(c, total_updates)

    frozen = {"params": {"llm": llama_params}}
    # The first host-sized batch: parameter shapes do not depend on which rows it holds.
    example = make_batch(next(BatchIterator(dataset, "train", host_batch, seed=config.seed,
                                            process_index=0, process_count=1)))
    trainable = mesh_lib.init_sharded(model, jax.random.PRNGKey(config.seed), _to_device(example),
                                      item_table, mesh=mesh, rules=rules,
                                      collections=rsllm.TRAINABLE)
    if preload_table is not None:
        iid_rows = [tokenizer.convert_tokens_to_ids(templates.iid_token(i)) - first_new
                    for i in range(catalogue.num_items)]
        trainable = rsllm.preload_iid_embeddings(trainable, preload_table, iid_rows,
                                           llama_params["embed_tokens"]["embedding"][:first_new],
                                           llama_config)
    if stage == "stage2" and stage_config.init_from_stage1:
        trainable = _restore_final(run_paths.stage_dir(workdir, "stage1"), trainable)
    # Explicit shardings from the logical axes (checked before compiling); host batches become
    # global arrays inside step_fn/eval_fn, the state is donated.
    layout = sharding.make_layout(mesh, rules, model, optimizer, config.seed, example, item_table)
    frozen = layout.put_frozen(frozen)
    item_table = layout.put_replicated(item_table)
    state = sharding.create_state(trainable, optimizer, config.seed, layout)
    step_fn = sharding.jit_train_step(
        train_step_lib.make_train_step(model, optimizer, c, with_towers), layout)
    eval_fn = sharding.jit_eval_step(train_step_lib.make_eval_step(model, c, with_towers), layout)

    def make_evaluator():
        from rsllm_jax.evaluation.evaluate import Evaluator  # It imports this module.

        return Evaluator(config, dataset, item_format, llama_config, frozen["params"]["llm"],
                         tokenizer, first_new, item_table, trainable=state.trainable)

    selection = _Selection(c.select_by, make_evaluator, config.eval)

    checkpoints = RunCheckpointer(run_paths.checkpoints_dir(stage_dir), stage)
    history = []
    restored, data, progress = checkpoints.restore(layout.abstract_state)
    if restored is not None:
        state = restored
        train_rows.set_state(data)
        history = progress["history"]
        logging.info("%s: resumed at step %d (epoch %d)", stage, int(state.step),
                     train_rows.epoch)

    def save(force=False):
        checkpoints.save(int(state.step), state, {"history": history}, train_rows.get_state(),
                         force=force)

    def crossed(step, every):
        """Whether the update that ended at `step` passed a multiple of `every` steps."""
        return step // every > (step - k) // every

    tokens_seen, flops_seen, start, last_log, timing = 0, 0.0, time.time(), time.time(), False
    with checkpoints:
        while int(state.step) < total_steps:
            first = int(state.step)
            epoch = first // train_rows.steps_per_epoch
            micro = [make_batch(next(train_rows), first + i) for i in range(k)]
            state, metrics = step_fn(state, frozen, batching.stack(micro), item_table)
            step = int(state.step)
            loss = float(metrics["total"])
            if not np.isfinite(loss):
                raise FloatingPointError(
                    f"{stage}: the loss is {loss} at step {step}; stopped without saving, the "
                    f"last good checkpoint is step {checkpoints.latest_step()} in {stage_dir}")
            if not timing:  # Rates exclude the first update (its compilation).
                start, timing = time.time(), True
            else:
                # Each host holds its slice of the batch: scale its counts to the global batch.
                for batch in micro:
                    tokens_seen += int(batch["attention_mask"].sum()) * jax.process_count()
                    flops_seen += flops_lib.batch_flops(llama_config, batch, with_towers,
                                                        item_table.shape[1]) \
                        * jax.process_count()
            if crossed(step, c.log_every) or time.time() - last_log > 60:
                elapsed = time.time() - start
                mfu = flops_lib.mfu(flops_seen / max(elapsed, 1e-9),
                                    jax.devices()[0].device_kind, jax.device_count())
                logging.info("%s: step %d/%d epoch %d %s %.0f tokens/s, %.3g TFLOP/s, MFU %s",
                             stage, step, total_steps, epoch, {k: round(float(v), 4)
                                                               for k, v in metrics.items()},
                             tokens_seen / max(elapsed, 1e-9), flops_seen / max(elapsed, 1e-9)
                             / 1e12, "n/a" if mfu is None else f"{mfu:.1%}")
                last_log = time.time()
            if crossed(step, train_rows.steps_per_epoch) or step == total_steps:
                val = _evaluate(eval_fn, state, frozen, dataset, make_batch, item_table,
                                c.batch_size)
                if selection.needs_answers and "val" in dataset.splits:
                    val.update(selection.answer_metrics(state.trainable))
                history.append(dict(epoch=epoch, step=step, train_loss=loss, val=val))
                logging.info("%s: epoch %d validation %s", stage, epoch, val)
                if selection.is_best(history):
                    _save_checkpoint(run_paths.best_path(stage_dir), state.trainable)
            if crossed(step, c.checkpoint_every) or step == total_steps:
                save()
            if checkpoints.preempted(step):
                save(force=True)
                checkpoints.stop(step)
    final, chosen = state.trainable, selection.best(history)
    if chosen is not None and chosen["step"] != int(state.step):
        logging.info("%s: keeping epoch %d (best validation %s = %.4f)", stage, chosen["epoch"],
                     c.select_by, chosen["val"][selection.metric])
        final = restore_like(run_paths.best_path(stage_dir), state.trainable)
    _save_checkpoint(run_paths.final_path(stage_dir), final)
    return dict(stage=stage, item_format=item_format, mesh=dict(mesh.shape),
                select_by=c.select_by, selected_epoch=None if chosen is None else chosen["epoch"],
                curriculum_from=stage_config.curriculum_from,
                preloaded_iid_embeddings=preload_table is not None,
                steps=int(state.step), epochs=history,
                tokens_per_second=tokens_seen / max(time.time() - start, 1e-9))


def _evaluate(eval_fn, state, frozen, dataset, make_batch, item_table, batch_size):
    """Mean loss parts over the validation split (weighted by real rows)."""
    if "val" not in dataset.splits:
        return {}
    sums, count = {}, 0
    for rows in BatchIterator(dataset, "val", batch_size, process_index=jax.process_index(),
                              process_count=jax.process_count()):
        # The parts are means over the global batch: weight them by its real rows, all
        # processes' (this process holds only its slice).
        n = int(mesh_lib.process_sum(int(rows["mask"].sum())))
        parts = eval_fn(state.trainable, frozen, _to_device(make_batch(rows)), item_table)
        for key, value in parts.items():
            sums[key] = sums.get(key, 0.0) + float(value) * n
        count += n
    return {key: value / count for key, value in sums.items()}


class _Selection:
    """Which epoch's parameters a stage keeps (config.train.select_by; paper §5.1: early
    stopping on validation). Every epoch is trained (stages are a few epochs) and the best one
    by the validation metric is kept, as the recommenders' training does:

      last                     the parameters after the last step
      val_nip                  the lowest validation NIP loss
      val_hit_ratio_at_1       the highest validation HitRatio@1, greedy answers judged by the
                               paper's rule (evaluation/answers.py)
      val_rank_hit_ratio_at_1  the highest validation HitRatio@1 of ranking the candidates by
                               likelihood (no generation: cheaper)

    Ties keep the earlier epoch. The best parameters are saved when they appear, so a killed
    run that resumes (and replays the validation deterministically) keeps the same ones.
    """

    METRICS = {"last": None, "val_nip": "nip", "val_hit_ratio_at_1": "hit_ratio_at_1",
               "val_rank_hit_ratio_at_1": "rank_hit_ratio_at_1"}

    def __init__(self, select_by, make_evaluator, eval_config):
        if select_by not in self.METRICS:
            raise ValueError(f"config.train.select_by={select_by!r}; expected one of "
                             f"{list(self.METRICS)}")
        self.metric = self.METRICS[select_by]
        self.needs_answers = self.metric not in (None, "nip")
        self._make_evaluator = make_evaluator
        self._evaluator = None
        self._eval_config = eval_config

    def answer_metrics(self, trainable):
        """Validation metrics of answering the prompts with `trainable`."""
        if self._evaluator is None:
            self._evaluator = self._make_evaluator()
        self._evaluator.set_trainable(trainable)
        generation = self.metric == "hit_ratio_at_1"
        metrics, _ = self._evaluator.evaluate_split(
            self._evaluator.dataset, "val", self._eval_config.batch_size,
            self._eval_config.max_new_tokens, generation=generation, constrained=False,
            ranking_by_likelihood=not generation, log_every=0)
        return {k: v for k, v in metrics.items() if isinstance(v, float) and k != "seconds"}

    def best(self, history):
        """The history entry of the kept parameters, or None for `last`."""
        scored = [h for h in history if self.metric in h.get("val", {})]
        if self.metric is None or not scored:
            return None
        sign = 1.0 if self.metric == "nip" else -1.0  # Lower loss, higher hit ratio.
        return min(scored, key=lambda h: (sign * h["val"][self.metric], h["step"]))

    def is_best(self, history):
        best = self.best(history)
        return best is not None and best is history[-1]


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
