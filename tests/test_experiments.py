"""The experiments command: shared steps once, every row × seed in its own folder, one table
with each row's mean ± std over its seeds; a rerun skips what finished."""

import json
import os

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
