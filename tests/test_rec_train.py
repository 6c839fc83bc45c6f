"""The `rec` step on the synthetic dataset: learning, determinism, resume, metrics file."""

import glob
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import base
from rsllm_jax import main
from rsllm_jax.data.prepare import prepare
from rsllm_jax.data.storage import PreparedDataset
from rsllm_jax.recommenders import embeddings, train
from rsllm_jax.recommenders import models as models_lib


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synthetic"))
    prepare("synthetic", "", out)
    return out


def _config(data_dir, **rec):
    config = base.get_config()
    config.data.name = "synthetic"
    config.data.dir = data_dir
    config.rec.update(dict(seeds="0", max_epochs=2, patience=2, batch_size=128), **rec)
    return config


@pytest.mark.parametrize("model,loss", [("sasrec", "ce"), ("gru4rec", "bce_dros")])
def test_learns_synthetic_sequences(data_dir, tmp_path, model, loss):
    config = _config(data_dir, model=model, loss=loss, max_epochs=5, checkpoint_every=100)
    metrics = train.run_step(config, str(tmp_path))
    # Random scoring gets 1/20 = 0.05; the synthetic users follow learnable genre patterns.
    assert metrics["test"]["hit_ratio_at_1"] > 0.25, metrics["test"]
    assert metrics["val"]["hit_ratio_at_1"] > 0.25, metrics["val"]


def test_same_seed_same_numbers_and_resume(data_dir, tmp_path):
    config = _config(data_dir, model="gru4rec", loss="bce")
    dataset = PreparedDataset(data_dir)
    _, params, summary = train.train_seed(config.rec, dataset, 0, str(tmp_path / "a"))
    _, again, summary_again = train.train_seed(config.rec, dataset, 0, str(tmp_path / "b"))
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, again)
    assert summary == summary_again
    # Stop after one epoch, then continue from its checkpoint to two: same as straight through.
    one_epoch = _config(data_dir, model="gru4rec", loss="bce", max_epochs=1).rec
    train.train_seed(one_epoch, dataset, 0, str(tmp_path / "c"))
    _, resumed, summary_resumed = train.train_seed(config.rec, dataset, 0, str(tmp_path / "c"))
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, resumed)
    assert summary_resumed == summary


def _write_nan_weights(checkpoints, step):
    """Rewrites checkpoint `step` with one weight NaN, as flipped bits can leave it (orbax
    stores no checksum: a damaged chunk may decompress to other numbers)."""
    manager = ocp.CheckpointManager(str(checkpoints))
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                      progress=ocp.args.JsonRestore()))
    state = jax.tree_util.tree_map(np.array, restored.state)
    state["params"]["params"]["head_bias"][7] = np.nan
    manager.delete(step)
    manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      progress=ocp.args.JsonSave(restored.progress)))
    manager.wait_until_finished()


@pytest.mark.parametrize("damage", ["nan_weights", "truncated_progress"])
def test_damaged_newest_checkpoint_falls_back_to_the_one_before(data_dir, tmp_path, damage):
    """A newest checkpoint that does not restore, or restores with NaN, is moved aside; the run
    resumes from the epoch before and ends with the numbers of an undamaged run."""
    rec = _config(data_dir, model="gru4rec", loss="bce").rec
    dataset = PreparedDataset(data_dir)
    run_dir = tmp_path / "seed"
    _, params, summary = train.train_seed(rec, dataset, 0, str(run_dir))
    if damage == "nan_weights":
        _write_nan_weights(run_dir / "checkpoints", 2)
    else:  # Cut inside its JSON.
        path = run_dir / "checkpoints" / "2" / "progress" / "metadata"
        path.write_bytes(path.read_bytes()[:40])
    _, resumed, summary_resumed = train.train_seed(rec, dataset, 0, str(run_dir))
    assert (run_dir / "checkpoints-damaged" / "2").is_dir()
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, resumed)
    assert summary_resumed == summary


def test_nan_loss_stops_the_seed_naming_the_epoch(data_dir, tmp_path):
    rec = _config(data_dir, model="sasrec", loss="bce", learning_rate=float("nan")).rec
    with pytest.raises(FloatingPointError, match=r"sasrec/bce seed 0: the loss is nan in epoch 0"):
        train.train_seed(rec, PreparedDataset(data_dir), 0, str(tmp_path))
    assert not os.listdir(tmp_path / "checkpoints")


def test_pipeline_writes_metrics_and_embeddings(data_dir, tmp_path):
    config = _config(data_dir, model="caser", loss="bce", seeds="0,1", max_epochs=1,
                     checkpoint_every=100)
    config.jobs = "rec"
    workdir = str(tmp_path)
    main.run_pipeline(config, workdir)
    with open(os.path.join(workdir, "metrics", "rec.json")) as f:
        metrics = json.load(f)["metrics"]
    assert (metrics["model"], metrics["loss"], metrics["seeds"]) == ("caser", "bce", [0, 1])
    assert metrics["test"]["num_draws"] == config.rec.selection_draws == 20
    for key in ("hit_ratio_at_1", "hit_ratio_at_5", "ndcg_at_5", "ndcg_at_10",
                "full_hit_ratio_at_10", "full_ndcg_at_10", "hit_ratio_at_1_over_draws"):
        per_seed = [
            json.load(open(os.path.join(workdir, "rec", "caser_bce", f"seed_{s}",
                                        "result.json")))["test"][key] for s in (0, 1)
        ]
        np.testing.assert_allclose(metrics["test"][key], np.mean(per_seed))
        np.testing.assert_allclose(metrics["test"][f"{key}_std"], np.std(per_seed, ddof=1))
    num_items = PreparedDataset(config.data.dir).catalogue.num_items
    table, meta = embeddings.load_item_embeddings(metrics["embeddings"], num_items)
    assert table.shape == (num_items + 1, 64) and (table[num_items] == 0).all()
    assert meta["model"] == "caser"


def test_resumed_step_refuses_seeds_of_another_recipe(data_dir, tmp_path):
    workdir = str(tmp_path)
    config = _config(data_dir, model="gru4rec", loss="bce", max_epochs=1, checkpoint_every=100)
    first = train.run_step(config, workdir)
    # A step killed after its seeds finished: rerun as is, or with a result-neutral change,
    # it reuses them; with a changed recipe it refuses instead of mixing seeds.
    assert train.run_step(config, workdir)["test"] == first["test"]
    config.rec.eval_batch_size = 64
    assert train.run_step(config, workdir)["test"] == first["test"]
    # Seeds recorded before a prepare setting existed (it had its default) are reused too.
    records = glob.glob(os.path.join(workdir, "rec", "*", "seed_*", "config.json"))
    assert records
    for recorded in records:
        old = json.load(open(recorded))
        del old["data"]["settings"]["distinct_candidate_titles"]
        json.dump(old, open(recorded, "w"))
    assert train.run_step(config, workdir)["test"] == first["test"]
    config.rec.learning_rate = 2e-3
    with pytest.raises(ValueError, match=r"config.rec.learning_rate: 0.001 → 0.002"):
        train.run_step(config, workdir)
    other_data = str(tmp_path / "other_data")
    prepare("synthetic", "", other_data, candidate_seed=1)
    config = _config(other_data, model="gru4rec", loss="bce", max_epochs=1)
    with pytest.raises(ValueError, match="the prepared data"):
        train.run_step(config, workdir)


def test_candidate_draws_are_valid_distinct_and_fixed(data_dir):
    dataset = PreparedDataset(data_dir)
    rows = dataset.read("val")
    draws = train.candidate_draws(dataset, "val", 6)
    assert draws.shape == (6, len(rows["target"]), 20)
    np.testing.assert_array_equal(draws[0], rows["candidates"])  # The stored sets come first.
    np.testing.assert_array_equal(draws, train.candidate_draws(dataset, "val", 6))
    for sets in draws[1:]:
        assert (sets != draws[0]).any(axis=1).mean() > 0.9  # Fresh negatives, not a reshuffle.
        for c, h, n, t in zip(sets, rows["history"], rows["history_len"], rows["target"]):
            assert len(set(c.tolist())) == 20 and (c == t).sum() == 1
            assert not set(c.tolist()) & set(h[:n].tolist()) - {t}  # Repeats: t may recur.


def test_hit_ratio_over_draws_matches_numpy(data_dir):
    dataset = PreparedDataset(data_dir)
    rows, num_items = dataset.read("test"), dataset.catalogue.num_items
    # Scores that depend on each row's last history item, computed in batches of 16.
    table = np.random.default_rng(0).normal(size=(num_items + 1, num_items)).astype(np.float32)
    last = lambda history, length: history[np.arange(len(length)), np.maximum(length - 1, 0)]
    score_fn = lambda params, history, length: params[last(history, length)]
    draws = train.candidate_draws(dataset, "test", 5)
    metrics = train.evaluate(score_fn, table, dataset, "test", 16, draws)
    scores = table[last(rows["history"], rows["history_len"])]
    expected = [
        np.mean(
            [s[c].argmax() == list(c).index(t) for s, c, t in zip(scores, sets, rows["target"])])
        for sets in draws
    ]
    np.testing.assert_allclose(metrics["hit_ratio_at_1_over_draws"], np.mean(expected))
    np.testing.assert_allclose(metrics["hit_ratio_at_1"], expected[0])
    assert metrics["num_draws"] == 5
    assert "hit_ratio_at_1_over_draws" not in train.evaluate(score_fn, table, dataset, "test")


@pytest.mark.parametrize("draws,key", [(1, "hit_ratio_at_1"), (4, "hit_ratio_at_1_over_draws")])
def test_early_stopping_keeps_the_best_epoch_of_the_selection_metric(data_dir, tmp_path, draws,
                                                                     key):
    config = _config(data_dir, model="gru4rec", loss="bce", max_epochs=4, patience=4,
                     selection_draws=draws, checkpoint_every=100)
    dataset = PreparedDataset(data_dir)
    model, params, summary = train.train_seed(config.rec, dataset, 0, str(tmp_path))
    history = summary["val_history"]
    assert summary["best_epoch"] == int(np.argmax(history))  # The earliest best epoch.
    val = train.evaluate(train.make_score_fn(model), params, dataset, "val", 512,
                         train.candidate_draws(dataset, "val", draws))
    assert round(val[key], 6) == max(history)


def test_bad_settings_are_named(data_dir, tmp_path):
    with pytest.raises(ValueError, match="config.rec.loss"):
        train.run_step(_config(data_dir, loss="hinge"), str(tmp_path))
    with pytest.raises(ValueError, match="unknown recommender"):
        train.run_step(_config(data_dir, model="bert4rec"), str(tmp_path))
    with pytest.raises(ValueError, match="config.rec.seeds"):
        train.parse_seeds("0,x")
    with pytest.raises(ValueError, match="config.rec.selection_draws"):
        train.run_step(_config(data_dir, selection_draws=0), str(tmp_path))


@pytest.mark.parametrize("model,expected", [("sasrec", 1e-4), ("gru4rec", 1e-6), ("caser", 1e-6)])
def test_default_weight_decay_is_llaras_per_model(model, expected):
    # LLaRA's released checkpoints record their L2 decay: SASRec 1e-4 (all datasets), GRU and
    # Caser 1e-6. A flat 1e-6 left LastFM SASRec far below LLaRA's and the paper's numbers.
    rec = base.get_config().rec
    rec.model = model
    assert train.weight_decay(rec) == expected
    rec.weight_decay = 0.0  # An explicit value wins.
    assert train.weight_decay(rec) == 0.0


def test_bce_step_matches_torch_dros_step():
    """Five BCE steps of ours equal DROS/LLaRA's PyTorch loop (model_output → gather target and
    one negative → BCEWithLogitsLoss over the concatenation → Adam with coupled L2) started from
    the same weights (dropout 0: its random masks differ); so do five `bce_dros` steps, with
    DROS's distributionally robust term added as its loop computes it."""
    torch = pytest.importorskip("torch")
    from rsllm_jax.checkpoint import llara_rec
    import test_llara_rec as reference  # LLaRA's model classes restated in PyTorch.

    torch.set_num_threads(1)  # Tiny ops: extra threads only contend with XLA's.

    num_items, batch = reference.NUM_ITEMS, 16
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 11, batch)
    states = rng.integers(0, num_items, (batch, 10))
    for row, n in enumerate(lengths):
        states[row, n:] = num_items
    target = rng.integers(0, num_items, batch)
    negative = (target + rng.integers(1, num_items, batch)) % num_items
    feed = dict(history=states.astype(np.int32), history_len=lengths.astype(np.int32),
                target=target.astype(np.int32), negative=negative.astype(np.int32),
                mask=np.ones(batch, bool))
    converters = dict(gru4rec=llara_rec.gru_params, sasrec=llara_rec.sasrec_params,
                      caser=lambda s: llara_rec.caser_params(s, (2, 3, 4)))
    # DROS's extra term (`bce_dros`) over the whole catalogue, with item weights as DROS derives
    # them from target counts.
    propensity = train.propensity_scores(rng.integers(0, num_items, 200), num_items, 0.05)
    # SASRec only, to keep the suite short (each model's step takes seconds to compile): the
    # loss and optimiser code is shared, and test_llara_rec checks every model's forward.
    for name, cls, loss_name in (("sasrec", reference.SASRec, "bce"), ("sasrec", reference.SASRec,
                                                                       "bce_dros")):
        torch.manual_seed(0)
        module = cls(dropout=0.0) if name == "sasrec" else cls()
        if name == "caser":
            module.dropout.p = 0.0
        if name == "sasrec":  # Trained-like LayerNorms: at init (scale 1, bias 0) LLaRA's
            with torch.no_grad():  # query mask sign(|sum(LN(x))|) is ~0 and flips at random.
                for key, value in module.named_parameters():
                    if key.startswith("ln_") or "layer_norm" in key:
                        value.add_(0.05 * torch.randn_like(value))
        state = {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}
        params = {
            "params": dict(item_embeddings=dict(embedding=state["item_embeddings.weight"]),
                           head_kernel=state["s_fc.weight"].T, head_bias=state["s_fc.bias"],
                           **converters[name](state))
        }
        params = jax.tree_util.tree_map(lambda x: jax.numpy.asarray(x, "float32"), params)
        model = models_lib.build_model(name, num_items, dropout_rate=0.0)
        optimizer = train.make_optimizer(1e-3, 1e-4)
        step = train.make_train_step(model, loss_name, optimizer, jax.numpy.asarray(propensity),
                                     dros_alpha=0.1, dros_beta=1.0)
        opt_state = optimizer.init(params)
        torch_optimizer = torch.optim.Adam(module.parameters(), lr=1e-3, eps=1e-8,
                                           weight_decay=1e-4)
        bce = torch.nn.BCEWithLogitsLoss()
        t_states, t_lengths = torch.as_tensor(states), torch.as_tensor(lengths)
        t_target, t_negative = torch.as_tensor(target)[:, None], torch.as_tensor(negative)[:, None]
        module.train()
        for _ in range(5):
            output = module(t_states, t_lengths)
            scores = torch.cat(
                [torch.gather(output, 1, t_target),
                 torch.gather(output, 1, t_negative)], 0)
            labels = torch.cat([torch.ones(batch, 1), torch.zeros(batch, 1)], 0)
            loss = bce(scores, labels)
            if loss_name == "bce_dros":  # As DROS's loop writes it (alpha 0.1, beta 1).
                ps = torch.as_tensor(propensity)
                inner = (torch.exp(ps * output**2).sum(1) -
                         torch.exp(torch.gather(ps * output**2, 1, t_target)[:, 0]) +
                         torch.exp(torch.gather(ps * (output - 1)**2, 1, t_target)[:, 0]))
                loss = loss + 0.1 * torch.log(inner + 1e-24).mean()
            torch_optimizer.zero_grad()
            loss.backward()
            torch_optimizer.step()
            params, opt_state, ours = step(params, opt_state, feed, jax.random.key(0))
            np.testing.assert_allclose(float(ours), loss.item(), rtol=1e-5, err_msg=loss_name)
        np.testing.assert_allclose(params["params"]["item_embeddings"]["embedding"],
                                   module.item_embeddings.weight.detach().numpy(), atol=1e-5)
        np.testing.assert_allclose(params["params"]["head_kernel"],
                                   module.s_fc.weight.detach().numpy().T, atol=1e-5)
