"""The `pretrain` step: full-parameter training of the base, read back by the LLM stages."""

import jax
import numpy as np
import pytest

from configs import demo
from rsllm_jax import main
from rsllm_jax.data.storage import PreparedDataset
from rsllm_jax import run_paths
from rsllm_jax.models import base
from rsllm_jax.training import pretrain


def _config(steps=24):
    config = demo.get_config()
    config.jobs = "prepare,pretrain"
    config.data.synthetic.num_users = 80
    config.data.synthetic.num_items = 30
    config.model.demo_vocab_size = 400
    config.prompts.length_buckets = "512"  # One bucket: one compilation.
    config.pretrain.steps = steps
    config.pretrain.batch_size = 8
    config.pretrain.learning_rate = 3e-3
    config.pretrain.checkpoint_every = 4
    return config


def _assert_trees_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("pretrain"))
    config = _config()
    results = main.run_pipeline(config, workdir)
    return config, workdir, results["pretrain"]


def test_pretraining_lowers_the_loss_and_the_stages_read_its_base(pretrained):
    config, workdir, metrics = pretrained
    assert metrics["steps"] == 24
    # 24 steps at batch 8 on a 30-item catalogue: the answer loss falls well below its start.
    assert metrics["last_loss"] < 0.8 * metrics["first_loss"], metrics
    assert np.isfinite(metrics["val_loss"])
    catalogue = PreparedDataset(f"{workdir}/data").catalogue
    _, loaded, _ = base.load_base_model(config, catalogue, workdir)
    _, random_init, _ = base.load_base_model(config, catalogue, workdir, pretrained=False)
    saved = base.restore_like(run_paths.pretrained_path(workdir), random_init)
    _assert_trees_equal(loaded, saved)
    changed = jax.tree.map(lambda a, b: not np.array_equal(np.asarray(a), np.asarray(b)), loaded,
                           random_init)
    assert all(jax.tree.leaves(changed)), "every base parameter trains"


def test_interrupted_pretraining_resumes_to_the_same_parameters(pretrained, tmp_path, monkeypatch):
    config, reference_dir, _ = pretrained
    workdir = str(tmp_path)
    make_train_step = pretrain.make_train_step

    def dies_after_six_steps(model, optimizer, layout):
        step, calls = make_train_step(model, optimizer, layout), []

        def counted(*args):
            calls.append(1)
            if len(calls) > 6:
                raise KeyboardInterrupt("killed")
            return step(*args)

        return counted

    monkeypatch.setattr(pretrain, "make_train_step", dies_after_six_steps)
    killed = _config()
    killed.train.prefetch = 0  # Batches collated between steps; the reference prefetched them.
    with pytest.raises(KeyboardInterrupt):
        main.run_pipeline(killed, workdir)
    resumed_steps = []

    def counts_steps(model, optimizer, layout):
        step = make_train_step(model, optimizer, layout)
        return lambda *args: resumed_steps.append(1) or step(*args)

    monkeypatch.setattr(pretrain, "make_train_step", counts_steps)
    metrics = main.run_pipeline(config, workdir)["pretrain"]
    assert metrics["steps"] == 24
    assert len(resumed_steps) == 24 - 4, "resumes from the checkpoint of step 4"
    catalogue = PreparedDataset(f"{workdir}/data").catalogue
    _, resumed, _ = base.load_base_model(config, catalogue, workdir)
    _, reference, _ = base.load_base_model(config, catalogue, reference_dir)
    _assert_trees_equal(resumed, reference)


def test_a_nan_loss_stops_pretraining_naming_its_step(tmp_path, monkeypatch):
    config = _config(steps=8)
    config.train.log_every = 100  # Losses are read at the checkpoint steps (4, 8) only.
    make_train_step = pretrain.make_train_step

    def nan_at_step_three(model, optimizer, layout):
        step, calls = make_train_step(model, optimizer, layout), []

        def poisoned(*args):
            calls.append(1)
            params, opt_state, loss = step(*args)
            return params, opt_state, loss * np.nan if len(calls) == 3 else loss

        return poisoned

    monkeypatch.setattr(pretrain, "make_train_step", nan_at_step_three)
    with pytest.raises(
            FloatingPointError, match=r"pretrain: the loss is nan at step 3 \(checked "
            r"steps \[1, 4\]\); stopped without saving, the last good checkpoint is "
            r"none yet"):
        main.run_pipeline(config, str(tmp_path))
    checkpoints = tmp_path / "pretrain" / "checkpoints"
    assert not checkpoints.exists() or not [p for p in checkpoints.iterdir() if p.name.isdigit()]


def test_stages_without_the_pretrained_base_are_a_clear_error(tmp_path):
    config = _config()
    config.jobs = "prepare,stage1"
    with pytest.raises(FileNotFoundError, match="run the pretrain step first"):
        main.run_pipeline(config, str(tmp_path))


def test_the_demo_base_beats_chance_after_pretraining(tmp_path):
    """The demo's tiny random-init base, pre-trained for 3/4 of the demo's steps, ranks the
    true item of the validation rows first far more often than chance."""
    config = demo.get_config("zero_shot")  # prepare → pretrain → eval of the base.
    assert config.jobs == "prepare,pretrain,eval"
    config.pretrain.steps = 600
    config.eval.split = "val"
    config.eval.max_new_tokens = 16
    metrics = main.run_pipeline(config, str(tmp_path))["eval"]
    assert metrics["n"] == 60
    # Chance over 20 candidates: HR@1 0.05, NDCG@10 0.227 (mean of 1/log2(r + 2), r < 10).
    assert metrics["rank_hit_ratio_at_1"] >= 0.15, metrics
    assert metrics["rank_ndcg_at_10"] >= 0.3, metrics
