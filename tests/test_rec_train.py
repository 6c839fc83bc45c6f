"""The `rec` step on the synthetic dataset: learning, determinism, resume, metrics file."""

import json
import os

import jax
import numpy as np
import pytest

from configs import base
from rsllm_jax import main
from rsllm_jax.data.prepare import prepare
from rsllm_jax.data.storage import PreparedDataset
from rsllm_jax.recommenders import embeddings, train


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


def test_learns_synthetic_sequences(data_dir, tmp_path):
    config = _config(data_dir, model="sasrec", loss="ce", max_epochs=5, checkpoint_every=100)
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


def test_pipeline_writes_metrics_and_embeddings(data_dir, tmp_path):
    config = _config(data_dir, model="caser", loss="bce", seeds="0,1", max_epochs=1,
                     checkpoint_every=100)
    config.jobs = "rec"
    workdir = str(tmp_path)
    main.run_pipeline(config, workdir)
    with open(os.path.join(workdir, "metrics", "rec.json")) as f:
        metrics = json.load(f)["metrics"]
    assert (metrics["model"], metrics["loss"], metrics["seeds"]) == ("caser", "bce", [0, 1])
    for key in ("hit_ratio_at_1", "hit_ratio_at_5", "ndcg_at_5", "ndcg_at_10",
                "full_hit_ratio_at_10", "full_ndcg_at_10"):
        per_seed = [json.load(open(os.path.join(workdir, "rec", "caser_bce", f"seed_{s}",
                                                "result.json")))["test"][key] for s in (0, 1)]
        np.testing.assert_allclose(metrics["test"][key], np.mean(per_seed))
        np.testing.assert_allclose(metrics["test"][f"{key}_std"], np.std(per_seed, ddof=1))
    num_items = PreparedDataset(config.data.dir).catalogue.num_items
    table, meta = embeddings.load_item_embeddings(metrics["embeddings"], num_items)
    assert table.shape == (num_items + 1, 64) and (table[num_items] == 0).all()
    assert meta["model"] == "caser"


def test_bad_settings_are_named(data_dir, tmp_path):
    with pytest.raises(ValueError, match="config.rec.loss"):
        train.run_step(_config(data_dir, loss="hinge"), str(tmp_path))
    with pytest.raises(ValueError, match="unknown recommender"):
        train.run_step(_config(data_dir, model="bert4rec"), str(tmp_path))
    with pytest.raises(ValueError, match="config.rec.seeds"):
        train.parse_seeds("0,x")
