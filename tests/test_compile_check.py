"""The compile-ahead check compiles a sharded stage-2 step from abstract shapes and reports."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compile_check_prints_memory_and_flops():
    # A 2-device fsdp mesh: the flags for the simulated devices are set by the command itself.
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    result = subprocess.run([
        sys.executable, "-m", "rsllm_jax.compile_check", "--config", "configs/demo.py",
        "--topology", "2:1,2,1", "--model", "tiny", "--batch", "4", "--length", "32", "--answer",
        "16", "--target", "16", "--num_new_tokens", "8", "--scan_layers", "false"
    ], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "2 cpu devices, mesh {'data': 1, 'fsdp': 2, 'tensor': 1}" in out
    for field in ("arguments", "outputs", "temporaries", "peak_estimate"):
        assert f"memory per device, {field}" in out
    analytic = float(out.split("analytic (model FLOPs, all positions real):")[1].split()[0])
    compiled = float(out.split("per device × 2):")[1].split()[0])
    assert analytic > 0
    # XLA also counts full (not causal) attention and element-wise work (unrolled layers: a
    # scanned loop body would count once).
    assert 0.8 < compiled / analytic < 3.0, out


def test_impossible_topology_fails_before_compiling():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    result = subprocess.run([
        sys.executable, "-m", "rsllm_jax.compile_check", "--config", "configs/demo.py",
        "--topology", "data2_tensor4", "--model", "bench", "--batch", "8"
    ], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "num_kv_heads = 2 is not divisible by the 4-way tensor axis" in result.stderr
