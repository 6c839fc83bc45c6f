"""The whole demo pipeline on 8 simulated CPU devices: the 8-device mesh presets give the
metrics of the 1-device run.

A reduced demo (small catalogue, a few steps) runs `prepare` and `rec` once; then `stage2 →
eval` (stage 2 from a fresh LoRA: stage 1 runs the same train step on other prompts) runs under
the `single` preset and under each 8-device preset from copies of that folder, and stage 2's
validation losses and every evaluation metric must agree within float tolerance. The device
count is fixed before JAX starts, so the runs happen in a subprocess (this file as a script).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

# data8 (plain data parallelism) is left to the one-step check of tests/test_sharded_train.py:
# these two cover sharded parameters (fsdp) and sharded heads (tensor) through every step.
PRESETS = ("single", "fsdp8", "data2_tensor4")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_8_device_presets_give_the_single_device_metrics():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                            timeout=1200, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    for preset in PRESETS[1:]:
        assert f"preset {preset} ok" in result.stdout, result.stdout[-3000:]


def _config():
    from configs import demo  # pylint: disable=g-import-not-at-top

    config = demo.get_config()
    config.data.synthetic.num_users = 80
    config.data.synthetic.num_items = 60
    config.model.demo_vocab_size = 400
    config.pretrain.steps = 0  # Single-device full training; tests/test_pretrain.py covers it.
    config.train.batch_size = 8  # Divisible by data×fsdp of every preset.
    config.train.learning_rate = 3e-3
    config.train.checkpoint_every = 100
    config.prompts.length_buckets = "512"  # One bucket: one compilation per step function.
    config.rec.max_epochs = 2
    config.eval.max_new_tokens = 8
    config.eval.constrained = False  # Generation and ranking cover the decoding paths.
    config.stage2.max_steps = 4
    config.stage2.init_from_stage1 = False
    return config


def _compare(got, want, what):
    for key, value in want.items():
        if isinstance(value, float) and key != "seconds":
            np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=1e-5,
                                       err_msg=f"{what} {key}")


def _run_all():
    sys.path.insert(0, REPO)  # configs/ is a folder of the repository, not a package.
    import jax  # pylint: disable=g-import-not-at-top

    from rsllm_jax import main  # pylint: disable=g-import-not-at-top
    from rsllm_jax.parallel import layouts  # pylint: disable=g-import-not-at-top

    assert jax.device_count() == 8
    with tempfile.TemporaryDirectory() as tmp:
        shared = os.path.join(tmp, "shared")
        config = _config()
        config.jobs = "prepare,rec"
        main.run_pipeline(config, shared)
        results = {}
        for preset in PRESETS:
            workdir = os.path.join(tmp, preset)
            shutil.copytree(shared, workdir)
            config = _config()
            config.mesh.preset = preset
            config.jobs = "prepare,rec,stage2,eval"
            start = time.time()
            results[preset] = main.run_pipeline(config, workdir)
            print(f"preset {preset}: {time.time() - start:.0f} s", flush=True)
            mesh = {"data": 1, "fsdp": 1, "tensor": 1} if preset == "single" else dict(
                zip(("data", "fsdp", "tensor"), layouts.PRESETS[preset]))
            assert results[preset]["stage2"]["mesh"] == mesh, (preset, results[preset]["stage2"])
            if preset == "single":
                continue
            _compare(results[preset]["stage2"]["epochs"][-1]["val"],
                     results["single"]["stage2"]["epochs"][-1]["val"], f"{preset} stage2")
            _compare(results[preset]["eval"], results["single"]["eval"], f"{preset} eval")
            print(
                f"preset {preset} ok",
                json.dumps({
                    k: results[preset]["eval"][k]
                    for k in ("hit_ratio_at_1", "rank_hit_ratio_at_1")
                }), flush=True)


if __name__ == "__main__":
    _run_all()
