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


def test_step_recorded_before_a_prepare_setting_existed_is_reused(tmp_path):
    """A step's record that lacks a prepare setting added later (it had its default) is reused,
    as its prepared folder is; with the setting changed it is refused."""
    config = _small_demo()
    main.run_pipeline(config, str(tmp_path))
    metrics_path = tmp_path / "metrics" / "prepare.json"
    record = json.loads(metrics_path.read_text())
    del record["config"]["data"]["distinct_candidate_titles"]
    del record["config"]["data"]["synthetic"]["items_per_title"]
    metrics_path.write_text(json.dumps(record))
    main.run_pipeline(config, str(tmp_path))
    assert json.loads(metrics_path.read_text()) == record  # Reused, not redone.
    config.data.synthetic.items_per_title = 2
    with pytest.raises(ValueError, match=r"data.synthetic.items_per_title: 1 → 2"):
        main.run_pipeline(config, str(tmp_path))


def test_step_recorded_before_any_setting_existed_is_reused(tmp_path):
    """A setting of any section added since a step ran had its default's effect there
    (configs/base.py's default): the step is reused while the setting keeps its default, and
    refused once it does not."""
    config = demo.get_config()
    sections = main.config_sections(config, main.STEPS["stage1"])
    del sections["train"]["projector_lr_scale"]
    del sections["stage1"]["curriculum_from"]
    metrics_path = tmp_path / "metrics" / "stage1.json"
    metrics_path.parent.mkdir()
    metrics_path.write_text(json.dumps(dict(step="stage1", config=sections, metrics={"loss": 1})))
    assert main._finished_steps(config, str(tmp_path), ["stage1"]) == {"stage1": {"loss": 1}}
    config.train.projector_lr_scale = 10.0
    with pytest.raises(ValueError, match=r"train.projector_lr_scale: 1.0 → 10.0"):
        main._finished_steps(config, str(tmp_path), ["stage1"])


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
    result = subprocess.run([
        sys.executable, "-m", "rsllm_jax.main", "--config", "configs/demo.py", "--workdir",
        str(tmp_path), "--config.jobs=prepare", "--config.data.synthetic.num_users=40"
    ], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((tmp_path / "metrics" / "prepare.json").read_text())
    assert record["config"]["data"]["synthetic"]["num_users"] == 40


def test_refused_run_leaves_config_json_as_it_was(tmp_path):
    config = _small_demo()
    main.run_pipeline(config, str(tmp_path))
    written = (tmp_path / "config.json").read_text()
    config.data.min_history = 4
    with pytest.raises(
            ValueError, match=r"prepare.json: step 'prepare' was completed with a "
            r"different config \(data.min_history: 3 → 4\)"):
        main.run_pipeline(config, str(tmp_path))
    assert (tmp_path / "config.json").read_text() == written


def test_seed_decides_the_llm_steps_not_the_shared_ones(tmp_path):
    """A finished eval under seed 0 is reused for seed 0 and refused for seed 1; `prepare`
    (and `rec`) do not depend on it, so runs over several seeds can share them."""
    config = _small_demo()
    main.run_pipeline(config, str(tmp_path))
    config.seed = 1
    assert main.run_pipeline(config, str(tmp_path))["prepare"]["splits"]["val"]["rows"] == 5
    config.seed = 0
    config.jobs = "prepare,eval"
    record = dict(step="eval", config=main.config_sections(config, main.STEPS["eval"]),
                  metrics=dict(hit_ratio_at_1=0.5))
    (tmp_path / "metrics" / "eval.json").write_text(json.dumps(record))
    assert main.run_pipeline(config, str(tmp_path))["eval"] == dict(hit_ratio_at_1=0.5)
    config.seed = 1
    with pytest.raises(ValueError, match=r"eval.json: step 'eval' .* \(seed: 0 → 1\)"):
        main.run_pipeline(config, str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 0


def test_bad_mesh_is_refused_before_any_step(tmp_path):
    config = _small_demo()
    config.jobs = "prepare,stage1"
    config.mesh.shape = "2,x"
    with pytest.raises(
            ValueError, match=r"config.mesh.shape='2,x': expected three "
            r"comma-separated integers"):
        main.run_pipeline(config, str(tmp_path))
    assert not (tmp_path / "data").exists()


def test_a_folder_in_an_unknown_store_is_refused_before_any_step(tmp_path):
    config = _small_demo()
    with pytest.raises(
            ValueError, match=r"ftp://host/run: a run folder is a local path or a "
            r"URL of gs://, s3://, not ftp://"):
        main.run_pipeline(config, "ftp://host/run")
    config.data.dir = "az://container/data"
    with pytest.raises(ValueError, match=r"az://container/data: .*, not az://"):
        main.run_pipeline(config, str(tmp_path))
    assert not list(tmp_path.iterdir())


def _run_main(tmp_path, *flags, env=None):
    return subprocess.run([
        sys.executable, "-m", "rsllm_jax.main", "--config", "configs/demo.py", "--workdir",
        str(tmp_path), "--config.jobs=prepare", *flags
    ], cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ, **(env or {})))


def test_bad_input_is_one_line_and_the_traceback_on_demand(tmp_path):
    done = _run_main(tmp_path, "--config.data.min_histroy=5")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "--config.data.min_histroy=5: the config has no field 'min_histroy' (did you mean "
        '"min_history"?)')
    assert "Traceback" not in done.stderr
    missing = tmp_path / "nowhere"
    done = _run_main(tmp_path, "--config.data.name=lastfm", f"--config.data.source={missing}")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"DataError: {missing}: source folder does not exist")
    done = _run_main(tmp_path, "--config.data.name=lastfm", f"--config.data.source={missing}",
                     env={"RSLLM_TRACEBACK": "1"})
    assert done.returncode == 1 and "Traceback (most recent call last)" in done.stderr


def test_a_finished_run_evaluated_on_val_keeps_its_test_record(tiny_run, tmp_path):
    import shutil

    source, config, results = tiny_run
    workdir = str(tmp_path / "run")
    shutil.copytree(source, workdir)
    test_record = (tmp_path / "run" / "metrics" / "eval.json").read_text()
    config = config.copy_and_resolve_references()
    config.eval.split = "val"
    metrics = main.run_pipeline(config, workdir)["eval"]
    assert metrics["split"] == "val" and metrics["n"] == 6  # One row per val user.
    record = json.loads((tmp_path / "run" / "metrics" / "eval_val.json").read_text())
    assert record["metrics"] == metrics and record["config"]["eval"]["split"] == "val"
    assert (tmp_path / "run" / "metrics" / "eval.json").read_text() == test_record
    assert results["eval"]["split"] == "test"
    # Done on both splits now: each is skipped with its own record.
    assert main.run_pipeline(config, workdir)["eval"] == metrics
    config.eval.split = "test"
    assert main.run_pipeline(config, workdir)["eval"] == json.loads(test_record)["metrics"]
