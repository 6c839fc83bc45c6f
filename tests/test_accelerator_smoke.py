"""benchmarks/accelerator.sh --smoke: the accelerator experiment's code paths at toy size."""

import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _smoke(out, *args, timeout):
    """Runs the script's smoke mode into `out`, asserting it succeeds."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", )}
    result = subprocess.run(
        ["bash", "benchmarks/accelerator.sh", "--smoke", "--out",
         str(out), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_accelerator_script_smoke_mode(tmp_path):
    _smoke(tmp_path, timeout=900)
    summary = open(tmp_path / "summary.txt").read()
    for row in ("SASRec", "pre-trained base zero-shot", "TALLRec", "RSLLM (SASRec)"):
        assert f"| synthetic | {row} |" in summary, summary
    assert "MFU" in summary and "step" in summary  # The timed stage-2 step.
    assert "remat none" in summary and "remat full" in summary  # The memory search.
    assert os.path.exists(tmp_path / "table" / "results.md")

    # One row again into the same folder: its finished run is read back, not trained again.
    _smoke(tmp_path, "--parts", "a", "--rows", "tallrec", timeout=300)
    summary = open(tmp_path / "summary.txt").read()
    assert "| synthetic | TALLRec |" in summary and "| synthetic | RSLLM" not in summary, summary
    assert "MFU" not in summary  # --parts a: no stage-2 timing.
    log = open(tmp_path / "table" / "tallrec" / "seed0" / "log.txt").read()
    assert "step stage1: done already" in log and "step eval: done already" in log, log[-3000:]
