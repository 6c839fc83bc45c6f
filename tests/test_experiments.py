"""The experiments command: shared steps once, every row × seed in its own folder, one table
with each row's mean ± std over its seeds; a rerun skips what finished."""

import json
import os

import pytest

from rsllm_jax import experiments

# The demo, shrunk: a few items and users, two pre-training steps, two LLM steps per row, one
# length bucket (one compilation per step function).
SMALL = [
    "--config.data.synthetic.num_users=40", "--config.data.synthetic.num_items=30",
    "--config.rec.max_epochs=1", "--config.pretrain.steps=2", "--config.pretrain.batch_size=4",
    "--config.model.demo_vocab_size=400", "--config.prompts.length_buckets=512",
    "--config.train.batch_size=4", "--config.eval.batch_size=8", "--config.eval.max_new_tokens=4",
    "--config.eval.constrained=false"
]


def test_rows_times_seeds_share_one_base_and_report_mean_and_std(tmp_path, capsys):
    out = str(tmp_path / "table")
    argv = [
        "--config", "configs/demo.py", "--rows", "zero_shot,tallrec", "--seeds", "0,1", "--out",
        out, "--llm_steps", "2"
    ] + SMALL
    experiments.main(argv)
    table = capsys.readouterr().out
    # The shared steps ran once; every row × seed has its own finished run.
    assert sorted(os.listdir(os.path.join(
        out, "shared", "metrics"))) == ["prepare.json", "pretrain.json", "rec.json"]
    base = os.path.join(out, "shared", "pretrain", "hf")
    for row in ("zero_shot", "tallrec"):
        for seed in (0, 1):
            run = os.path.join(out, row, f"seed{seed}")
            config = json.load(open(os.path.join(run, "config.json")))
            assert config["seed"] == seed and config["model"]["name"] == base
            assert not os.path.exists(os.path.join(run, "data"))  # The shared data.
    tallrec = json.load(open(os.path.join(out, "tallrec", "seed1", "metrics", "stage1.json")))
    assert tallrec["metrics"]["steps"] == 2  # --llm_steps over its one stage.
    # One row per method over its two seeds, the recommender beside them.
    assert "| synthetic | SASRec |" in table
    assert "| synthetic | pre-trained base zero-shot (2 seeds) |" in table
    assert "| synthetic | TALLRec (2 seeds) |" in table
    assert os.path.getsize(os.path.join(out, "hit_ratio.png")) > 0
    assert open(os.path.join(out, "results.md")).read() in table
    # Run again: nothing is redone (every step is skipped), the same table.
    stamp = os.path.getmtime(os.path.join(out, "tallrec", "seed0", "metrics", "eval.json"))
    experiments.main(argv)
    assert capsys.readouterr().out.endswith(open(os.path.join(out, "results.md")).read())
    assert os.path.getmtime(os.path.join(out, "tallrec", "seed0", "metrics", "eval.json")) == stamp


def _unequal(config_file, rows, overrides=()):
    return experiments.unequal_micro_batches(experiments.row_configs(config_file, rows, overrides))


def test_rows_with_different_micro_batches_are_named():
    # On LastFM TALLRec takes LLaRA's optimiser (8 rows a micro-batch), RSLLM the base config's.
    rows = ["zero_shot", "tallrec", "rsllm"]
    assert _unequal("configs/lastfm.py", rows) == "tallrec 8, rsllm 32"
    same = ["--config.train.batch_size=8"]  # Overrides apply after the preset.
    assert _unequal("configs/lastfm.py", rows, same) == ""
    assert _unequal("configs/demo.py", rows) == ""


def test_a_row_override_applies_to_that_row_only_and_wins(tmp_path, monkeypatch):
    # The shared-titles table's two step counts in one command: the one-stage rows train 6,000
    # steps in stage1, RSLLM 1,500 there and the rest in stage2.
    rows = ["tallrec", "rsllm"]
    common, per_row = experiments.split_overrides([
        "--config.stage1.max_steps=6000", "--rsllm.config.stage1.max_steps=1500",
        "--rsllm.config.stage2.max_steps=6000"
    ], rows)
    assert common == ["--config.stage1.max_steps=6000"]
    assert per_row == {
        "tallrec": [],
        "rsllm": ["--config.stage1.max_steps=1500", "--config.stage2.max_steps=6000"]
    }
    configs = experiments.row_configs("configs/demo.py", rows, common, per_row)
    assert configs["tallrec"].stage1.max_steps == 6000
    assert (configs["rsllm"].stage1.max_steps, configs["rsllm"].stage2.max_steps) == (1500, 6000)

    commands = {}
    monkeypatch.setattr(
        experiments, "_pipeline", lambda config, workdir, flags, log: commands.update(
            {os.path.relpath(workdir, tmp_path): flags}))
    monkeypatch.setattr(experiments.report, "collect_rows", lambda dirs: [])
    experiments.run("configs/demo.py", configs, [0], str(tmp_path), common, llm_steps=20,
                    row_overrides=per_row)

    def last(flags, field):  # A repeated --config flag: the last one counts (as in main).
        return [f for f in flags if f.startswith(f"--config.{field}=")][-1].partition("=")[2]

    shared, tallrec, rsllm = (commands[d] for d in ("shared", "tallrec/seed0", "rsllm/seed0"))
    assert not set(per_row["rsllm"]) & set(shared)  # The shared steps take no row's override.
    assert last(tallrec, "stage1.max_steps") == "20"  # --llm_steps over its one stage.
    assert last(rsllm, "stage1.max_steps") == "1500" and last(rsllm, "stage2.max_steps") == "6000"
    assert tallrec[-1] == rsllm[-1] == "--config.seed=0"

    for bad, says in [("--rsllm.config.data.min_history=5", "shared by the rows"),
                      ("--rsllm.config.seed=3", "set by this command"),
                      ("--llara.config.stage1.max_steps=5", "for a row of --rows"),
                      ("--rsllm.stage1.max_steps=5", "unrecognised")]:
        with pytest.raises(ValueError, match=says):
            experiments.split_overrides([bad], rows)
