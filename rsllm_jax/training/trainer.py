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

import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from rsllm_jax.checkpoint.resume import RunCheckpointer
from rsllm_jax.data.pipeline import BatchIterator
from rsllm_jax.data.prepare import data_dir
from rsllm_jax.data.storage import PreparedDataset
from rsllm_jax.models import llama, lora as lora_lib, rsllm
from rsllm_jax.parallel import layouts, mesh as mesh_lib
from rsllm_jax.prompts import batching, encoding, templates
from rsllm_jax.training import flops as flops_lib, optim, sharding, train_step as train_step_lib

PLACEHOLDER_FORMATS = ("hybrid", "behavior", "llara")
STAGES = ("stage1", "stage2")


# --- the base model ---------------------------------------------------------------------------

def pretrained_path(workdir):
    """Where the `pretrain` step leaves the base's parameters (training/pretrain.py)."""
    return os.path.abspath(os.path.join(workdir, "pretrain", "final"))


def load_base_model(config, catalogue, workdir, mesh=None, rules="fsdp_tp", pretrained=True):
    """(LlamaConfig with LoRA, frozen Llama params, tokenizer) from config.model.

    config.model.name: a preset of `models.llama.CONFIGS` (random init, with a SentencePiece
    tokenizer trained on the dataset's text: no download), a `.gguf` file, or a Hugging Face
    Llama directory. With a `mesh` the parameters are created or read directly into their
    shards, after the layout is checked against the model and config.train.batch_size. With
    config.pretrain.steps > 0 (and `pretrained`) the parameters are those the `pretrain` step
    trained from that base.
    """

    def check(llama_config):
        if mesh is not None:
            sharding.validate_model(mesh, rules, llama_config, config.train.batch_size)

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
        check(llama_config)
        base = llama.Llama(llama_config.replace(lora=None))
        params = mesh_lib.init_sharded(base, jax.random.PRNGKey(m.init_seed),
                                       jnp.ones((1, 1), jnp.int32), mesh=mesh,
                                       rules=rules)["params"]
    elif m.name.endswith(".gguf"):
        from rsllm_jax.checkpoint import gguf

        from rsllm_jax.checkpoint import hf

        llama_config, tensors, _ = gguf.read_gguf(m.name, **overrides)
        check(llama_config)
        params = hf.params_from_tensors(llama_config, tensors, mesh=mesh, rules=rules)
        tokenizer = gguf.tokenizer_from_gguf(m.name)
    else:
        from rsllm_jax.checkpoint import hf

        llama_config = hf.config_from_hf(hf.read_config(m.name), **overrides)
        check(llama_config)
        params = hf.params_from_tensors(llama_config, hf.open_hf_weights(m.name), mesh=mesh,
                                        rules=rules)
        tokenizer = hf.load_tokenizer(m.name)
    if pretrained and config.pretrain.steps > 0:
        path = pretrained_path(workdir)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path}: config.pretrain.steps={config.pretrain.steps} but the base has not "
                "been pre-trained in this workdir; run the pretrain step first (config.jobs) or "
                "set config.pretrain.steps=0")
        params = _restore_checkpoint(path, params)  # Into the same shardings.
    return llama_config, params, tokenizer


def item_formats(config):
    """Every item format of the run: the stages' formats, then their curriculum start formats
    (after, so a run without a curriculum keeps its token ids)."""
    formats = [config.stage1.item_format, config.stage2.item_format]
    return formats + [config[stage].curriculum_from for stage in STAGES
                      if config[stage].curriculum_from]


def stage_formats(config, stage):
    """The item formats one stage trains on: its own, and its curriculum's start format."""
    stage_config = config[stage]
    start = stage_config.curriculum_from
    return [stage_config.item_format] + ([start] if start and start != stage_config.item_format
                                         else [])


def _preloads_iid_rows(config, stage):
    """Whether this stage initialises the [IID<n>] rows from the projected recommender table:
    it trains on prompts with IID tokens (text-ID or IID-only) from freshly initialised
    parameters."""
    fresh = stage == "stage1" or not config.stage2.init_from_stage1
    return (config.prompts.preload_iid_embeddings and config.prompts.iid_tokens and fresh
            and bool(set(templates.IID_FORMATS) & set(stage_formats(config, stage))))


def load_item_table(config, workdir, num_items, item_format):
    """The recommender's item-embedding table (num_items + 1, d); zeros when the format (one,
    or a list) has no behavioural tokens (the table is then never read)."""
    formats = [item_format] if isinstance(item_format, str) else list(item_format)
    if not set(formats) & set(PLACEHOLDER_FORMATS):
        return np.zeros((num_items + 1, config.rec.hidden_size), np.float32)
    return _read_item_table(config, workdir, num_items)


def _item_table_path(config, workdir):
    from rsllm_jax.recommenders.train import embeddings_path

    return config.prompts.item_embeddings or embeddings_path(workdir)


def _read_item_table(config, workdir, num_items):
    from rsllm_jax.recommenders import load_item_embeddings

    table, _ = load_item_embeddings(_item_table_path(config, workdir), num_items)
    return np.asarray(table, np.float32)


def _preload_table(config, workdir, num_items):
    """The table for pre-loading IID rows, or None (logged) when the rec step has not written
    one: a text-ID stage may run without the recommender (`--config.jobs=prepare,stage1`). An
    explicit config.prompts.item_embeddings must exist."""
    path = _item_table_path(config, workdir)
    if not config.prompts.item_embeddings and not os.path.exists(path):
        logging.warning("no recommender item table at %s: the [IID<n>] rows start random "
                        "(run the rec step first to pre-load them)", path)
        return None
    return _read_item_table(config, workdir, num_items)


def preload_iid_embeddings(trainable, item_table, iid_rows, embed_table, llama_config):
    """Sets new-token rows `iid_rows[n]` (of [IID<n>]) to Proj(e_n), paper §4.1.1 "pre-loading
    item embeddings", with the freshly initialised projector and the recommender table's rows.

    A random projector maps the recommender's rows to vectors whose norm has nothing to do with
    the LLM's token embeddings (tens of times larger for a Llama whose rows have std ~0.02), so
    the projected rows are rescaled by one common factor to the mean row norm of the base
    embedding table `embed_table` (its real-token rows): the directions, and so the items'
    relative geometry, are Proj's; the scale is that of the tokens around them. Stage 2's
    behavioural tokens are Proj(e) unscaled. Returns a new `trainable`.
    """
    adapter = trainable[rsllm.ADAPTER]
    projector = rsllm.Projector(llama_config.hidden_size)  # float32, as the parameters.
    items = np.asarray(item_table[:len(iid_rows)], np.float32)

    def preload(rows, projector_params, embed):
        projected = projector.apply({rsllm.ADAPTER: projector_params}, items)
        target_norm = jnp.linalg.norm(embed.astype(jnp.float32), axis=-1).mean()
        scale = target_norm / jnp.maximum(jnp.linalg.norm(projected, axis=-1).mean(), 1e-12)
        return rows.at[np.asarray(iid_rows)].set((projected * scale).astype(rows.dtype))

    rows = adapter["new_token_embedding"]
    # One compiled function; the rows keep their initialised layout on a mesh.
    updated = jax.jit(preload, out_shardings=getattr(rows, "sharding", None))(
        rows, adapter["projector"], embed_table)
    return dict(trainable, **{rsllm.ADAPTER: dict(adapter, new_token_embedding=updated)})


# --- LLaRA's curriculum ------------------------------------------------------------------------

# Mixed into the curriculum's random stream so it never coincides with another use of the seed.
_CURRICULUM_SALT = 0x11A7A


def curriculum_probability(step, total_steps):
    """The probability that an example of `step` (0-based) uses the stage's item format rather
    than `curriculum_from`: linear from 0 at the first step to 1 at the last step of the stage.

    LLaRA's curriculum prompt tuning raises this probability from text-only to hybrid prompts;
    its code counts steps within the epoch, so the ramp restarts every epoch. Here it spans the
    whole stage (`total_steps` is the stage's step count, max_steps included).
    """
    if total_steps <= 1:
        return 1.0
    return min(max(step / (total_steps - 1), 0.0), 1.0)


def curriculum_choices(seed, step, row_ids, total_steps):
    """For each row id, True when its example at `step` uses the stage's item format.

    Each draw is a uniform number from the stream of (seed, step, row id), so a run killed and
    resumed (it restores the step and the data order) makes the same choices, and so does any
    process count.
    """
    p = curriculum_probability(step, total_steps)
    draws = [np.random.default_rng([_CURRICULUM_SALT, int(seed), int(step), int(row)]).random()
             for row in row_ids]
    return np.asarray(draws) < p


# --- one stage -----------------------------------------------------------------------------

def _to_device(batch):
    return {k: jnp.asarray(v) for k, v in batch.items()}


def run_stage(config, workdir, stage):
    """Trains one stage; returns its metrics (losses per epoch, steps, tokens/s)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    stage_config = config[stage]
    stage_dir = os.path.join(workdir, stage)
    mesh, rules = layouts.mesh_from_config(config.mesh)  # Mesh ≠ devices fails here, first.
    dataset = PreparedDataset(data_dir(config, workdir))
    catalogue = dataset.catalogue
    llama_config, llama_params, tokenizer = load_base_model(config, catalogue, workdir, mesh,
                                                            rules)
    first_new = len(tokenizer)
    encoding.add_special_tokens(tokenizer, item_formats(config), catalogue.num_items,
                                config.prompts.iid_tokens)
    num_new = len(tokenizer) - first_new
    item_format = stage_config.item_format
    formats = stage_formats(config, stage)
    item_table = load_item_table(config, workdir, catalogue.num_items, formats)
    preload_table = _preload_table(config, workdir, catalogue.num_items) \
        if _preloads_iid_rows(config, stage) else None
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
        own = curriculum_choices(config.seed, step, rows["row_id"][real], total_steps)
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
        trainable = preload_iid_embeddings(trainable, preload_table, iid_rows,
                                           llama_params["embed_tokens"]["embedding"][:first_new],
                                           llama_config)
    if stage == "stage2" and stage_config.init_from_stage1:
        trainable = _restore_final(os.path.join(workdir, "stage1"), trainable)
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

    checkpoints = RunCheckpointer(os.path.join(stage_dir, "checkpoints"), stage)
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
                    _save_checkpoint(_best_path(stage_dir), state.trainable)
            if crossed(step, c.checkpoint_every) or step == total_steps:
                save()
            if checkpoints.preempted(step):
                save(force=True)
                checkpoints.stop(step)
    final, chosen = state.trainable, selection.best(history)
    if chosen is not None and chosen["step"] != int(state.step):
        logging.info("%s: keeping epoch %d (best validation %s = %.4f)", stage, chosen["epoch"],
                     c.select_by, chosen["val"][selection.metric])
        final = _restore_checkpoint(_best_path(stage_dir), state.trainable)
    _save_checkpoint(final_path(stage_dir), final)
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


def final_path(stage_dir):
    """Where a stage leaves its kept trainable parameters (stage 2 and `eval` read them)."""
    return os.path.abspath(os.path.join(stage_dir, "final"))


def _best_path(stage_dir):
    return os.path.abspath(os.path.join(stage_dir, "best"))


def _save_checkpoint(path, trainable):
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, trainable, force=True)
    checkpointer.wait_until_finished()


def _restore_checkpoint(path, like):
    return ocp.StandardCheckpointer().restore(
        path, jax.tree.map(ocp.utils.to_shape_dtype_struct, like))


def _restore_final(stage_dir, like):
    path = final_path(stage_dir)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: stage 2 starts from stage 1's parameters; run the "
                                "stage1 step first or set config.stage2.init_from_stage1=False")
    return _restore_checkpoint(path, like)


def run_stage1(config, workdir):
    return run_stage(config, workdir, "stage1")


def run_stage2(config, workdir):
    return run_stage(config, workdir, "stage2")
