"""The pipeline CLI: steps run in order, skip when done, refuse mixed configs."""

import json
import os
import subprocess
import sys

import pytest

from configs import demo
from rsllm_jax import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _small_demo():
    config = demo.get_config()
    config.jobs = "prepare"
    config.data.synthetic.num_users = 50
    return config


def test_prepare_step_writes_metrics_and_skips_when_done(tmp_path):
    config = _small_demo()
    results = main.run_pipeline(config, str(tmp_path))
    metrics_path = tmp_path / "metrics" / "prepare.json"
    record = json.loads(metrics_path.read_text())
    assert record["metrics"] == results["prepare"]
    assert record["metrics"]["splits"]["val"]["rows"] == 5
    assert (tmp_path / "data" / "dataset.json").exists()
    stamp = os.path.getmtime(metrics_path)
    assert main.run_pipeline(config, str(tmp_path)) == results
    assert os.path.getmtime(metrics_path) == stamp


def test_changed_config_is_refused_not_mixed(tmp_path):
    config = _small_demo()
    main.run_pipeline(config, str(tmp_path))
    config.data.min_history = 4
    with pytest.raises(ValueError, match="completed with a different config"):
        main.run_pipeline(config, str(tmp_path))


def test_unknown_step_is_refused():
    with pytest.raises(ValueError, match=r"unknown step\(s\) \['trian'\]"):
        main.parse_jobs("prepare, trian")


def test_real_dataset_without_source_is_a_clear_error(tmp_path):
    config = _small_demo()
    config.data.name = "lastfm"
    config.data.source = ""
    with pytest.raises(ValueError, match="config.data.source is empty"):
        main.run_pipeline(config, str(tmp_path))


def test_command_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "rsllm_jax.main", "--config", "configs/demo.py",
         "--workdir", str(tmp_path), "--config.jobs=prepare",
         "--config.data.synthetic.num_users=40"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((tmp_path / "metrics" / "prepare.json").read_text())
    assert record["config"]["data"]["synthetic"]["num_users"] == 40
