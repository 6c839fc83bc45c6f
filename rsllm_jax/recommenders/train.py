"""Training and evaluation of the conventional recommenders: the pipeline's `rec` step.

Setup as in LLaRA/DROS: Adam lr 1e-3 with L2 weight decay (PyTorch's coupled `weight_decay`; by
default the value LLaRA trained each model with, see `LLARA_WEIGHT_DECAY`), batch 256, loss
`bce` — the true item against one uniformly sampled negative —, `ce`, full-softmax
cross-entropy, or `bce_dros`, `bce` plus the distributionally robust term of DROS's training
loop (`dros_loss`). Each epoch ends with an evaluation on the validation split; training stops
when validation HitRatio@1 — averaged over `selection_draws` candidate draws, because LLaRA
redraws candidates at every evaluation and one fixed set of 122 rows is noisy — has not
improved for `patience` epochs, and the best epoch's params are kept. DROS (whose training
loop LLaRA reuses) trains a fixed 500 epochs and keeps the best validation checkpoint: on LastFM
the `bce` recipe needs tens of epochs (Caser first sits on a plateau for several epochs: its
N(0, 0.01) item embeddings give near-constant features), so a short patience stops it long
before it has learned (measured: patience 5 ended LastFM Caser after 6 epochs at test
HitRatio@1 0.05). Several seeds are trained and their test metrics averaged
(the paper reports the mean of 5 runs, §5.1). With `init_from`, a LLaRA checkpoint is imported
instead of training.

Every seed's run is resumable: an orbax checkpoint at each epoch end holds params, optimiser
state, the best params so far, the early-stopping state and the input iterator's position, so
a killed run continues with exactly the numbers an uninterrupted one would have produced. The
last three are kept: a damaged newest one (it does not restore, or holds NaN) is moved aside and
the run resumes from the newest good one (checkpoint/resume.py). A NaN or infinite loss stops
the run naming the epoch, before that epoch is saved.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from rsllm_jax import config_lists, monitoring, run_paths
from rsllm_jax.checkpoint.resume import RunCheckpointer
from rsllm_jax.data import candidates as candidates_lib
from rsllm_jax.data.pipeline import BatchIterator
from rsllm_jax.data.storage import PreparedDataset, with_defaults
from rsllm_jax.evaluation import ranking
from rsllm_jax.parallel import mesh as mesh_lib
from rsllm_jax.recommenders import embeddings as embeddings_lib
from rsllm_jax.recommenders import models as models_lib
from rsllm_jax.recommenders import saved as saved_lib

LOSSES = ("bce", "ce", "bce_dros")
# L2 weight decay of LLaRA's released recommenders, read from their archive names
# (`..._lr0.001_l2decay_<value>_seed_1234`, ljy0ustc/LLaRA rec_model/): SASRec 1e-4 on LastFM,
# MovieLens and Steam; GRU and Caser 1e-6 on MovieLens (DROS's default `--l2_decay`). Used when
# config.rec.weight_decay < 0.
LLARA_WEIGHT_DECAY = {"sasrec": 1e-4, "gru4rec": 1e-6, "caser": 1e-6}
_NEGATIVE_STREAM = 3  # Seed-stream tag of the BCE negatives (the data layer uses 0-2).

# --- losses --------------------------------------------------------------------------------


def sample_negatives(target, row_id, num_items, seed, epoch):
    """One negative per row, uniform over the items other than the target (as in DROS/LLaRA's
    BCE training), a pure function of (seed, epoch, row id)."""
    keys = np.asarray(row_id, np.uint64) ^ candidates_lib.stream_key(seed, _NEGATIVE_STREAM, epoch)
    draw = candidates_lib.random_uint64(keys, 0, 1)[:, 0] % np.uint64(num_items - 1)
    draw = draw.astype(np.int32)
    return draw + (draw >= np.asarray(target)).astype(np.int32)  # Skip over the target.


def bce_loss(positive_scores, negative_scores, mask):
    """Binary cross-entropy, label 1 for the true item and 0 for the negative, averaged over
    the 2·(real rows) scores like PyTorch's BCEWithLogitsLoss over the concatenated pair."""
    per_row = optax.sigmoid_binary_cross_entropy(positive_scores, 1.0) + \
        optax.sigmoid_binary_cross_entropy(negative_scores, 0.0)
    return (per_row * mask).sum() / (2.0 * jnp.maximum(mask.sum(), 1.0))


def propensity_scores(train_targets, num_items, gamma):
    """DROS's item weights: ((count + 1) / total) ** gamma, counts of each item as a train
    target; gamma < 1 flattens the popularity distribution (DROS: 0.05)."""
    counts = np.bincount(np.asarray(train_targets), minlength=num_items)[:num_items] + 1.0
    return ((counts / counts.sum())**gamma).astype(np.float32)


def dros_loss(scores, target, mask, propensity, beta):
    """The distributionally robust term of DROS (Yang et al., SIGIR 2023) as its released
    training loop computes it: per row log Σ_j exp(w_j (s_j - y_j)² / beta), y the one-hot
    target and w the propensity weights, averaged over real rows. (DROS writes it as
    Σ_j exp(w_j s_j²/β) - exp(w_t s_t²/β) + exp(w_t (s_t - 1)²/β); logsumexp is the same
    value without overflow.)"""
    labels = jax.nn.one_hot(target, scores.shape[-1], dtype=scores.dtype)
    per_row = jax.nn.logsumexp(propensity * (scores - labels)**2 / beta, axis=-1)
    return (per_row * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def ce_loss(scores, target, mask):
    """Softmax cross-entropy over the whole catalogue, averaged over real rows."""
    per_row = optax.softmax_cross_entropy_with_integer_labels(scores, target)
    return (per_row * mask).sum() / jnp.maximum(mask.sum(), 1.0)


# --- steps ---------------------------------------------------------------------------------


def make_optimizer(learning_rate, weight_decay):
    """Adam with L2 regularisation added to the gradient, i.e. torch.optim.Adam(weight_decay=)
    as LLaRA/DROS train their recommenders (not AdamW's decoupled decay)."""
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate))


def weight_decay(rec):
    """config.rec.weight_decay, or LLaRA's value for config.rec.model when it is negative."""
    if rec.weight_decay >= 0:
        return float(rec.weight_decay)
    if rec.model not in LLARA_WEIGHT_DECAY:
        raise ValueError(f"unknown recommender config.rec.model={rec.model!r}; choose one "
                         f"of {tuple(LLARA_WEIGHT_DECAY)}")
    return LLARA_WEIGHT_DECAY[rec.model]


def selection_key(rec):
    """The validation metric early stopping maximises: HitRatio@1 on the stored candidate sets,
    or its mean over config.rec.selection_draws candidate draws when that is > 1."""
    if rec.selection_draws < 1:
        raise ValueError(f"config.rec.selection_draws={rec.selection_draws}: must be >= 1")
    return "hit_ratio_at_1_over_draws" if rec.selection_draws > 1 else "hit_ratio_at_1"


def make_train_step(model, loss, optimizer, propensity=None, dros_alpha=None, dros_beta=None,
                    mesh=None):
    """A jitted (params, opt_state, batch, dropout_key) → (params, opt_state, loss).
    `bce_dros` (BCE + dros_alpha · `dros_loss`) needs the `propensity_scores`, alpha and beta.
    With `mesh` (`mesh.data_parallel_mesh`) the parameters, optimiser state, key and loss are
    replicated over it and the batch is split over all its devices (every process's too)."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")
    if loss == "bce_dros" and any(x is None for x in (propensity, dros_alpha, dros_beta)):
        raise ValueError("loss 'bce_dros' needs the items' propensity scores, alpha and beta")

    def loss_fn(params, batch, dropout_key):
        rngs = {"dropout": dropout_key}
        mask = batch["mask"].astype(jnp.float32)
        if loss == "bce":  # Only two head columns per row are needed: skip the full product.
            items = jnp.stack([batch["target"], batch["negative"]], axis=1)
            scores = model.apply(params, batch["history"], batch["history_len"], items,
                                 deterministic=False, rngs=rngs, method=model.score_items)
            return bce_loss(scores[:, 0], scores[:, 1], mask)
        scores = model.apply(params, batch["history"], batch["history_len"], deterministic=False,
                             rngs=rngs)
        if loss == "ce":
            return ce_loss(scores, batch["target"], mask)
        pick = lambda items: jnp.take_along_axis(scores, items[:, None], axis=1)[:, 0]
        return (bce_loss(pick(batch["target"]), pick(batch["negative"]), mask) +
                dros_alpha * dros_loss(scores, batch["target"], mask, propensity, dros_beta))

    def train_step(params, opt_state, batch, dropout_key):
        value, grads = jax.value_and_grad(loss_fn)(params, batch, dropout_key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    if mesh is None:
        return jax.jit(train_step, donate_argnums=(0, 1))
    replicated, rows = mesh_lib.replicated(mesh), NamedSharding(mesh, PartitionSpec("data"))
    return jax.jit(train_step, donate_argnums=(0, 1),
                   in_shardings=(replicated, replicated, rows, replicated),
                   out_shardings=(replicated, replicated, replicated))


def make_score_fn(model):
    """A jitted (params, history, history_len) → catalogue scores, dropout off."""
    return jax.jit(lambda params, history, history_len: model.apply(params, history, history_len))


def candidate_draws(dataset, split, num_draws):
    """(num_draws, rows, 20) candidate sets of one split, row order as `dataset.read(split)`:
    the stored fixed sets first, then num_draws - 1 more drawn by the same rule (19 negatives
    outside the row's history) from their own seed streams.

    LLaRA redraws the candidates at every evaluation; HitRatio@1 averaged over many draws
    estimates that protocol's expected value, with far less noise than one set of 122 rows.
    """
    rows = dataset.read(split)
    settings = dataset.manifest["settings"]
    rules = candidates_lib.draw_rules(dataset.catalogue, settings)
    draws = [rows["candidates"]]
    for draw in range(1, num_draws):
        draws.append(
            candidates_lib.candidates_for_rows(
                rows["history"], rows["history_len"], rows["target"], rows["row_id"],
                dataset.catalogue.num_items,
                (settings["candidate_seed"], candidates_lib.SPLIT_STREAM[split], draw), **rules))
    return np.stack(draws)


def evaluate(score_fn, params, dataset, split, batch_size=512, draws=None):
    """`ranking.recommendation_metrics` of `params` on one split's fixed candidate sets, plus
    `hit_ratio_at_1_over_draws` (the mean over `draws`, from `candidate_draws`) when given."""
    rows = dataset.read(split)
    scores = np.concatenate([
        np.asarray(
            score_fn(params, rows["history"][i:i + batch_size],
                     rows["history_len"][i:i + batch_size]))
        for i in range(0, len(rows["target"]), batch_size)
    ])
    metrics = ranking.recommendation_metrics(scores, rows["candidates"], rows["target"])
    if draws is not None:
        hits = [
            ranking.hit_ratio(
                ranking.ranks(np.take_along_axis(scores, sets.astype(np.int64), axis=1),
                              ranking.candidate_target_index(sets, rows["target"])), 1).mean()
            for sets in draws
        ]
        metrics.update(hit_ratio_at_1_over_draws=float(np.mean(hits)), num_draws=len(draws))
    return metrics


# --- one seed --------------------------------------------------------------------------------


def model_kwargs(rec):
    """The model constructor's arguments from config.rec."""
    return dict(hidden_size=rec.hidden_size, max_len=rec.max_len, dropout_rate=rec.dropout,
                num_heads=rec.num_heads, num_filters=rec.num_filters,
                filter_sizes=config_lists.ints(rec.filter_sizes, "config.rec.filter_sizes"))


def train_seed(rec, dataset, seed, run_dir, val_draws=None):
    """Trains one seed with early stopping (resuming from `run_dir`'s checkpoint if any);
    returns (model, best params, summary dict with best_epoch, epochs_run and the val history).
    `val_draws`: the validation candidate draws, when the caller has them already."""
    num_items = dataset.catalogue.num_items
    model = models_lib.build_model(rec.model, num_items, **model_kwargs(rec))
    optimizer = make_optimizer(rec.learning_rate, weight_decay(rec))
    propensity = None
    if rec.loss == "bce_dros":
        propensity = jnp.asarray(
            propensity_scores(dataset.read("train")["target"], num_items, rec.dros_gamma))
    # Data parallel over every device of every process: each process feeds its slice of every
    # batch; parameters and optimiser state are replicated (they are small).
    mesh = mesh_lib.data_parallel_mesh(rec.batch_size)
    rows_sharding = NamedSharding(mesh, PartitionSpec("data"))
    train_step = make_train_step(model, rec.loss, optimizer, propensity, rec.dros_alpha,
                                 rec.dros_beta, mesh)
    score_fn = make_score_fn(model)
    if val_draws is None:
        val_draws = candidate_draws(dataset, "val", rec.selection_draws)
    selection_metric = selection_key(rec)
    init_key, dropout_key = jax.random.split(jax.random.key(seed))
    # Replicated once: each step's key is folded from it on every device.
    dropout_key = jax.random.wrap_key_data(
        mesh_lib.replicate(jax.random.key_data(dropout_key), mesh))
    train = BatchIterator(dataset, "train", rec.batch_size, seed=seed, in_memory=True,
                          with_candidates=False)
    dummy = jnp.zeros((1, rec.max_len), jnp.int32)
    params = mesh_lib.replicate(model.init(init_key, dummy, jnp.ones((1, ), jnp.int32)), mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=mesh_lib.replicated(mesh))(params)
    state = dict(params=params, opt_state=opt_state, best_params=params)
    progress = dict(epoch=0, step=0, best_hit_ratio=-1.0, best_epoch=-1, val_history=[])

    # Several epochs are kept: a damaged newest one falls back to the one before it.
    checkpoints = RunCheckpointer(run_paths.checkpoints_dir(run_dir), f"rec: seed {seed}",
                                  max_to_keep=3)
    restored, _, restored_progress = checkpoints.restore(
        jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state), with_data=False)
    if restored is not None:
        state, progress = restored, restored_progress
        train.set_state(progress["iterator"])
        logging.info("rec: seed %d resumed after epoch %d", seed, progress["epoch"])
    params, opt_state = state["params"], state["opt_state"]
    best_params = state["best_params"]

    def save(force=False):
        checkpoints.save(progress["epoch"],
                         dict(params=params, opt_state=opt_state, best_params=best_params),
                         progress, force=force)

    with checkpoints, monitoring.MetricWriter(
            run_dir, resume_step=progress["epoch"] if restored is not None else None) as writer, \
            monitoring.progress(rec.max_epochs, f"rec seed {seed}", initial=progress["epoch"],
                                unit="epoch") as bar:
        while (progress["epoch"] < rec.max_epochs
               and progress["epoch"] - progress["best_epoch"] <= rec.patience):
            epoch, losses = progress["epoch"], []
            for _ in range(train.steps_per_epoch):
                batch = next(train)
                feed = dict(history=batch["history"], history_len=batch["history_len"],
                            target=batch["target"], mask=batch["mask"])
                if rec.loss in ("bce", "bce_dros"):
                    feed["negative"] = sample_negatives(batch["target"], batch["row_id"], num_items,
                                                        seed, epoch)
                # A global batch of every process's slice.
                feed = mesh_lib.global_batch(feed, rows_sharding, agree_shapes=False)
                params, opt_state, loss = train_step(
                    params, opt_state, feed, jax.random.fold_in(dropout_key, progress["step"]))
                progress["step"] += 1
                losses.append(loss)
            mean_loss = float(np.mean(losses))
            if not np.isfinite(mean_loss):
                raise FloatingPointError(
                    f"rec: {rec.model}/{rec.loss} seed {seed}: the loss is {mean_loss} in epoch "
                    f"{epoch}; stopped without saving it (checkpoints of the epochs before are in "
                    f"{checkpoints.directory})")
            val = evaluate(score_fn, params, dataset, "val", rec.eval_batch_size, val_draws)
            hit = val[selection_metric]
            progress["val_history"].append(round(hit, 6))
            if hit > progress["best_hit_ratio"]:  # Strictly better: the earliest best epoch wins.
                progress["best_hit_ratio"], progress["best_epoch"] = hit, epoch
                best_params = jax.tree_util.tree_map(jnp.copy, params)
            progress["epoch"] = epoch + 1
            progress["iterator"] = train.get_state()
            writer.write(epoch + 1, dict(loss=mean_loss), "train")
            writer.write(epoch + 1, val, "val")
            bar.update(1)
            logging.info("rec: %s/%s seed %d epoch %d loss %.4f val HR@1 %.4f (best %.4f @ %d)",
                         rec.model, rec.loss, seed, epoch, mean_loss, hit,
                         progress["best_hit_ratio"], progress["best_epoch"])
            if (epoch + 1) % rec.checkpoint_every == 0:
                save()
            if checkpoints.preempted(epoch + 1):
                save(force=True)
                checkpoints.stop(epoch + 1)
    summary = dict(seed=seed, best_epoch=progress["best_epoch"], epochs_run=progress["epoch"],
                   val_history=progress["val_history"])
    return model, best_params, summary


# --- the pipeline step ----------------------------------------------------------------------


def parse_seeds(seeds):
    """'0,1,2' (or an int, or a sequence) → [0, 1, 2]."""
    out = list(config_lists.ints(seeds, "config.rec.seeds"))
    if not out:
        raise ValueError("config.rec.seeds is empty")
    return out


def _mean_std(runs):
    """{metric: mean, metric_std: sample std over runs (0 for one run)} of per-run dicts."""
    out = {}
    for key in runs[0]:
        if key in ("num_rows", "num_draws"):
            out[key] = runs[0][key]
            continue
        values = np.array([r[key] for r in runs], np.float64)
        out[key] = float(values.mean())
        out[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return out


# config.rec fields that do not change a seed's result: every other field is recorded in the
# seed's folder and must match when a killed step resumes.
_RESULT_NEUTRAL_FIELDS = ("seeds", "init_from", "eval_batch_size", "checkpoint_every")


def check_seed_config(run_dir, rec, dataset):
    """Records what a seed's run depends on (config.rec and the prepared data's settings) in
    `run_dir/config.json`, or, when a killed step left one, refuses (ValueError naming the
    fields) to resume it or reuse its result under a different config: one step's seeds
    must all come from the same recipe."""
    current = dict(
        rec={
            key: value
            for key, value in rec.to_dict().items() if key not in _RESULT_NEUTRAL_FIELDS
        }, data=dict(dataset=dataset.name, settings=dataset.manifest["settings"]))
    current = json.loads(json.dumps(current))  # Tuples → lists, as read back from the file.
    path = run_paths.as_path(run_dir) / "config.json"
    if path.exists():
        recorded = json.loads(path.read_text())
        # A seed recorded before a prepare setting existed ran with its default.
        recorded["data"]["settings"] = with_defaults(recorded["data"]["settings"])
        if recorded != current:
            changed = [
                f"config.rec.{key}: {recorded['rec'].get(key)!r} → {value!r}"
                for key, value in current["rec"].items() if recorded["rec"].get(key) != value
            ]
            if recorded["data"] != current["data"]:
                changed.append("the prepared data (dataset or prepare settings)")
            raise ValueError(f"{run_dir} holds a seed started with a different config "
                             f"({'; '.join(changed) or 'fields added or removed'}); use "
                             "another --workdir or delete that folder")
        return
    if not mesh_lib.is_primary():
        return
    run_paths.write_text(path, json.dumps(current, indent=2))


def run_step(config, workdir):
    """The pipeline's `rec` step (config.rec): train (or import) and evaluate a recommender,
    write its item-embedding table; returns the metrics written to metrics/rec.json."""
    rec = config.rec
    selection_key(rec)  # Refuses a bad selection_draws before any work.
    dataset = PreparedDataset(run_paths.data_dir(config, workdir))
    num_items = dataset.catalogue.num_items
    table_path = run_paths.item_embeddings_path(workdir)
    if rec.init_from:
        from rsllm_jax.checkpoint import llara_rec  # Only this path needs the importer.
        model, params = llara_rec.import_llara_recommender(rec.init_from, num_items)
        # Global arrays, so that every process can take part in saving them (orbax).
        params = mesh_lib.replicate(params, mesh_lib.data_parallel_mesh())
        model_name = type(model).__name__.lower()
        if model_name != rec.model:
            raise ValueError(f"config.rec.init_from={rec.init_from} holds a {model_name} but "
                             f"config.rec.model={rec.model!r}; set --config.rec.model="
                             f"{model_name}")
        score_fn = make_score_fn(model)
        results = {
            split: evaluate(score_fn, params, dataset, split, rec.eval_batch_size,
                            candidate_draws(dataset, split, rec.selection_draws))
            for split in ("val", "test")
        }
        embeddings_lib.save_item_embeddings(table_path,
                                            models_lib.item_embedding_table(params["params"]),
                                            num_items=num_items, model=rec.model,
                                            source=os.path.abspath(rec.init_from))
        saved_lib.save_recommender(saved_lib.recommender_dir(workdir), rec.model, model, params,
                                   os.path.abspath(rec.init_from))
        return dict(model=rec.model, loss="imported", seeds=[], init_from=rec.init_from,
                    embeddings=os.fspath(table_path), val=results["val"], test=results["test"])

    if rec.loss not in LOSSES:
        raise ValueError(f"config.rec.loss={rec.loss!r}; choose one of {LOSSES}")
    draws = {
        split: candidate_draws(dataset, split, rec.selection_draws)
        for split in ("val", "test")
    }
    runs = []
    for seed in parse_seeds(rec.seeds):
        run_dir = run_paths.as_path(workdir) / "rec" / f"{rec.model}_{rec.loss}" / f"seed_{seed}"
        result_path = run_dir / "result.json"
        mesh_lib.sync_processes(f"rec: seed {seed}")  # Process 0 may write its result next.
        check_seed_config(run_dir, rec, dataset)
        if result_path.exists():  # This seed finished in an earlier, killed run.
            runs.append(json.loads(result_path.read_text()))
            continue
        model, params, summary = train_seed(rec, dataset, seed, run_dir, draws["val"])
        score_fn = make_score_fn(model)
        for split in ("val", "test"):
            summary[split] = evaluate(score_fn, params, dataset, split, rec.eval_batch_size,
                                      draws[split])
        summary["embeddings"] = embeddings_lib.save_item_embeddings(
            run_dir / "item_embeddings.npy", models_lib.item_embedding_table(params["params"]),
            num_items=num_items, model=rec.model,
            source=f"rec step, {rec.model}/{rec.loss}, seed {seed}")
        saved_lib.save_recommender(run_dir / "recommender", rec.model, model, params,
                                   f"rec step, {rec.model}/{rec.loss}, seed {seed}")
        if mesh_lib.is_primary():
            run_paths.write_text(result_path, json.dumps(summary, indent=2))
        logging.info("rec: seed %d test HR@1 %.4f", seed, summary["test"]["hit_ratio_at_1"])
        runs.append(summary)
    # The LLM stages get the table of the seed with the best validation score (the same
    # metric early stopping uses).
    chosen = max(runs, key=lambda r: r["val"][selection_key(rec)])
    mesh_lib.sync_processes("rec: seeds written")
    if mesh_lib.is_primary():
        _keep_seed(chosen, table_path, workdir, num_items, rec.model)
    return dict(
        model=rec.model, loss=rec.loss, weight_decay=weight_decay(rec),
        seeds=[r["seed"] for r in runs], embeddings=os.fspath(table_path),
        embeddings_seed=chosen["seed"], val=_mean_std([r["val"] for r in runs]),
        test=_mean_std([r["test"] for r in runs]), per_seed=[
            dict(seed=r["seed"], best_epoch=r["best_epoch"], epochs_run=r["epochs_run"],
                 val_hit_ratio_at_1=r["val"]["hit_ratio_at_1"],
                 test_hit_ratio_at_1=r["test"]["hit_ratio_at_1"]) for r in runs
        ])


def _keep_seed(chosen, table_path, workdir, num_items, model_name):
    """Copies the chosen seed's item table (and parameters) to where the LLM steps read them."""
    table, meta = embeddings_lib.load_item_embeddings(chosen["embeddings"], num_items)
    embeddings_lib.save_item_embeddings(table_path, table, num_items=num_items, model=model_name,
                                        source=meta["source"])
    # Its parameters too, for scoring the whole catalogue (recommend, full-catalogue eval). A
    # seed finished before the rec step kept them has none: the loader falls back to its
    # checkpoint (recommenders/saved.py).
    chosen_params = run_paths.as_path(chosen["embeddings"]).parent / "recommender"
    if chosen_params.is_dir():
        saved_lib.recommender_dir(workdir).rmtree(missing_ok=True)
        run_paths.copy_tree(chosen_params, saved_lib.recommender_dir(workdir))
