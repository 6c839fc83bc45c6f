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
SMALL = ["--config.data.synthetic.num_users=80", "--config.data.synthetic.num_items=60",
         "--config.model.demo_vocab_size=400", "--config.train.batch_size=8",
         "--config.prompts.length_buckets=512"]


def _config(**stage_steps):
    config = demo.get_config()
    config.data.synthetic.num_users = 80
    config.data.synthetic.num_items = 60
    config.model.demo_vocab_size = 400
    config.model.lora_dropout = 0.0
    config.train.batch_size = 8
    config.train.learning_rate = 3e-3
    config.train.checkpoint_every = 4
    config.prompts.length_buckets = "512"  # One bucket: one compilation per step function.
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
    command = [sys.executable, "-m", "rsllm_jax.main", "--config", "configs/demo.py",
               "--workdir", workdir, "--config.jobs=prepare,stage1",
               "--config.model.lora_dropout=0.0", "--config.train.learning_rate=0.003",
               "--config.train.checkpoint_every=4", "--config.stage1.max_steps=12",
               "--config.stage2.max_steps=12"] + SMALL
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
    with pytest.raises(FloatingPointError, match=r"stage1: the loss is (nan|inf) at step \d+"):
        main.run_pipeline(config, str(tmp_path))
    assert not (tmp_path / "metrics" / "stage1.json").exists()
