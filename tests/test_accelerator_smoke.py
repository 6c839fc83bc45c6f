"""benchmarks/accelerator.sh --smoke: the accelerator experiment's code paths at toy size."""

import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_accelerator_script_smoke_mode(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", )}
    result = subprocess.run(
        ["bash", "benchmarks/accelerator.sh", "--smoke", "--out",
         str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = open(tmp_path / "summary.txt").read()
    for row in ("SASRec", "pre-trained base zero-shot", "TALLRec", "RSLLM (SASRec)"):
        assert f"| synthetic | {row} |" in summary, summary
    assert "MFU" in summary and "step" in summary  # The timed stage-2 step.
    assert "remat none" in summary and "remat full" in summary  # The memory search.
    assert os.path.exists(tmp_path / "table" / "results.md")
