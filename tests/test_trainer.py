"""The stage1/stage2 steps end to end on a small synthetic dataset with a tiny Llama:
the loss goes down, stage 2 starts from stage 1, kill-and-resume is exact, NaN stops cleanly."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import demo
from rsllm_jax import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [
    "--config.data.synthetic.num_users=80", "--config.data.synthetic.num_items=60",
    "--config.model.demo_vocab_size=400", "--config.train.batch_size=8",
    "--config.prompts.length_buckets=512", "--config.pretrain.steps=0"
]


def _config(**stage_steps):
    config = demo.get_config()
    config.data.synthetic.num_users = 80
    config.data.synthetic.num_items = 60
    config.model.demo_vocab_size = 400
    config.model.lora_dropout = 0.0
    config.pretrain.steps = 0  # tests/test_pretrain.py covers it.
    config.train.batch_size = 8
    config.train.learning_rate = 3e-3
    config.train.checkpoint_every = 4
    config.prompts.length_buckets = "512"  # One bucket: one compilation per step function.
    config.jobs = "prepare,rec,stage1,stage2,eval"
    # The killed run below has no rec step, hence no table to pre-load IID rows from.
    config.prompts.preload_iid_embeddings = False
    config.eval.max_new_tokens = 8
    config.train.select_by = "val_nip"  # Exercises keeping the best epoch (here: the only one).
    config.stage1.max_steps = stage_steps.get("stage1", 12)
    config.stage2.max_steps = stage_steps.get("stage2", 12)
    return config


def _final(workdir, stage):
    return ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(workdir, stage,
                                                                           "final")))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One uninterrupted run of every step."""
    workdir = str(tmp_path_factory.mktemp("run"))
    config = _config()
    config.train.profile_steps = "2,3"
    results = main.run_pipeline(config, workdir)
    return config, workdir, results


def test_both_stages_run_and_the_loss_goes_down(finished):
    _, workdir, results = finished
    for stage, fmt in (("stage1", "text_id"), ("stage2", "hybrid")):
        metrics = results[stage]
        assert metrics["item_format"] == fmt and metrics["steps"] == 12
        assert np.isfinite(metrics["epochs"][-1]["val"]["total"])
    first = json.loads(open(os.path.join(workdir, "metrics", "stage2.json")).read())
    assert first["metrics"]["epochs"][-1]["val"]["nip"] < \
        results["stage1"]["epochs"][-1]["val"]["nip"] + 1.0


def test_every_step_writes_its_curves_and_the_profile_window_is_traced(finished):
    config, workdir, results = finished
    lines = [
        json.loads(line)
        for line in open(os.path.join(workdir, "stage1", "metrics.jsonl")).read().splitlines()
    ]
    train = [r for r in lines if "train/total" in r]
    # Metrics leave the device at checkpoints (every 4 steps), log steps (10) and the end; the
    # loss parts are means over each interval.
    assert [r["step"] for r in train] == [4, 8, 10, 12]
    for key in ("train/nip", "train/item_item", "train/user_item", "train/grad_norm",
                "train/lora_norm", "train/projector_norm", "train/new_token_embedding_norm",
                "train/learning_rate", "train/tokens_per_second"):
        assert all(np.isfinite(r[key]) for r in train), key
    val = [r for r in lines if "val/nip" in r]
    assert len(val) == 1 and val[0]["step"] == 12
    assert val[0]["val/nip"] == pytest.approx(results["stage1"]["epochs"][-1]["val"]["nip"])
    for folder in ("stage1", "stage2", "eval", os.path.join("rec", "sasrec_bce", "seed_0")):
        assert os.listdir(os.path.join(workdir, folder, "tensorboard")), folder
    eval_line = json.loads(open(os.path.join(workdir, "eval", "metrics.jsonl")).readline())
    assert eval_line["test/rank_hit_ratio_at_1"] == results["eval"]["rank_hit_ratio_at_1"]
    for stage in ("stage1", "stage2"):
        traces = [
            name for _, _, names in os.walk(os.path.join(workdir, stage, "profile"))
            for name in names if name.endswith(".xplane.pb")
        ]
        assert len(traces) == 1, stage


def test_eval_evaluates_the_trained_stage2(finished):
    _, workdir, results = finished
    metrics = results["eval"]
    assert metrics["stage"] == "stage2" and metrics["item_format"] == "hybrid"
    assert metrics["n"] == 8 and metrics["constrained_valid_ratio"] == 1.0
    for key in ("valid_ratio", "hit_ratio_at_1", "strict_hit_ratio_at_1", "rank_hit_ratio_at_1",
                "rank_ndcg_at_10"):
        assert 0.0 <= metrics[key] <= 1.0, key


def test_stage2_starts_from_stage1(finished, tmp_path):
    config, workdir, _ = finished
    stage1 = _final(workdir, "stage1")
    stage2 = _final(workdir, "stage2")
    # Stage 2 moved on from stage 1's LoRA, which moved away from zero-initialised b.
    b1 = stage1["lora"]["llm"]["layers_0"]["self_attn"]["q_proj"]["b"]
    b2 = stage2["lora"]["llm"]["layers_0"]["self_attn"]["q_proj"]["b"]
    assert np.abs(b1).max() > 0 and not np.allclose(b1, b2)


def test_killed_run_resumes_to_the_same_parameters(finished, tmp_path):
    _, reference_dir, _ = finished
    workdir = str(tmp_path / "killed")
    command = [
        sys.executable,
        "-m",
        "rsllm_jax.main",
        "--config",
        "configs/demo.py",
        "--workdir",
        workdir,
        "--config.jobs=prepare,stage1",
        "--config.model.lora_dropout=0.0",
        "--config.train.learning_rate=0.003",
        "--config.train.checkpoint_every=4",
        "--config.stage1.max_steps=12",
        "--config.stage2.max_steps=12",
        "--config.prompts.preload_iid_embeddings=False",
        "--config.train.select_by=val_nip",
        # Collated in the loop here, two updates ahead in the reference: same batches.
        "--config.train.prefetch=0"
    ] + SMALL
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    checkpoints = os.path.join(workdir, "stage1", "checkpoints")
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        if os.path.isdir(checkpoints) and any(d.isdigit() and int(d) >= 4
                                              for d in os.listdir(checkpoints)):
            break
        time.sleep(0.2)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not os.path.exists(os.path.join(workdir, "stage1", "final"))
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=900)
    resumed = _final(workdir, "stage1")
    reference = _final(reference_dir, "stage1")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), resumed, reference)


def test_nan_loss_stops_naming_the_step(tmp_path):
    config = _config(stage1=3)
    config.jobs = "prepare,stage1"
    config.train.learning_rate = 1e30  # Diverges at once.
    config.train.grad_clip = 0.0
    with pytest.raises(
            FloatingPointError, match=r"stage1: the loss is (nan|inf) at step \d+ \(checked steps "
            r"\[1, 3\]\); stopped without saving, the last good checkpoint is "
            r"step None"):
        main.run_pipeline(config, str(tmp_path))
    assert not (tmp_path / "metrics" / "stage1.json").exists()


def test_title_that_cannot_fit_stops_the_stage_before_training(lastfm_source, tmp_path):
    titles = (lastfm_source / "id2name.txt").read_text().splitlines()
    titles[7] = "7::" + " ".join(["Verylongname"] * 770)  # 10,000 characters.
    (lastfm_source / "id2name.txt").write_text("\n".join(titles) + "\n")
    config = _config(stage1=3)
    config.jobs = "prepare,stage1"
    config.data.name, config.data.source = "lastfm", str(lastfm_source)
    with pytest.raises(ValueError, match=r"the longest items: item 7 'Verylongname"):
        main.run_pipeline(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "stage1").exists()


def test_selection_keeps_the_best_epoch_and_the_earlier_one_on_ties():
    from rsllm_jax.training.selection import EpochSelection

    history = [
        dict(epoch=0, step=10, val=dict(nip=2.0, hit_ratio_at_1=0.30)),
        dict(epoch=1, step=20, val=dict(nip=1.5, hit_ratio_at_1=0.40)),
        dict(epoch=2, step=30, val=dict(nip=1.7, hit_ratio_at_1=0.40))
    ]
    by_loss = EpochSelection("val_nip", None, None)
    by_hits = EpochSelection("val_hit_ratio_at_1", None, None)
    assert by_loss.best(history)["epoch"] == 1 and by_hits.best(history)["epoch"] == 1
    assert by_hits.is_best(history[:2]) and not by_hits.is_best(history)
    assert EpochSelection("last", None, None).best(history) is None
    with pytest.raises(ValueError, match="config.train.select_by='hr'"):
        EpochSelection("hr", None, None)
