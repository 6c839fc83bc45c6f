"""The pipeline on several processes: JAX's distributed runtime on localhost, CPU collectives
over gloo, started by launch/local_cluster.py. Two processes of two devices, stopped once by
SIGTERM to both, resume and record every number one process of four devices records; the
launcher stops the other processes and returns the code of one that was killed."""

import importlib.util
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The smallest pipeline that still runs every step: one rec epoch, a few steps of each LLM
# step (checkpoints every 2), one length bucket.
FLAGS = [
    "--config.data.synthetic.num_users=80", "--config.model.demo_vocab_size=400",
    "--config.prompts.length_buckets=512", "--config.rec.max_epochs=1", "--config.pretrain.steps=4",
    "--config.pretrain.batch_size=8", "--config.pretrain.checkpoint_every=2",
    "--config.train.batch_size=8", "--config.train.checkpoint_every=2",
    "--config.stage1.max_steps=8", "--config.stage2.max_steps=6", "--config.eval.max_new_tokens=4",
    "--config.eval.constrained=False", "--config.train.select_by=val_nip"
]
JOBS = "--config.jobs=rec,pretrain,stage1,stage2,eval"
# Numbers that depend on the machine's speed or the run folder, not on the computation.
UNTIMED = {"seconds", "train_seconds", "tokens_per_second", "path", "hf_path", "embeddings", "mesh"}


def _env(devices):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    return env


def _flags(workdir, data, *extra):
    return ["--workdir", workdir, f"--config.data.dir={data}", *FLAGS, *extra]


def _main(workdir, data, *extra):
    """The pipeline's command as one process."""
    return [
        sys.executable, "-m", "rsllm_jax.main", "--config", "configs/demo.py",
        *_flags(workdir, data, *extra)
    ]


def _cluster(workdir, data):
    """The launcher's command: 2 processes × 2 devices."""
    return [
        sys.executable, "launch/local_cluster.py", "2", "configs/demo.py", "--devices", "2",
        *_flags(workdir, data, JOBS)
    ]


def _metrics(workdir, step):
    with open(os.path.join(workdir, "metrics", f"{step}.json")) as f:
        return json.load(f)["metrics"]


def _differences(a, b, path=""):
    if isinstance(a, dict) and isinstance(b, dict):
        keys = (set(a) | set(b)) - UNTIMED
        return [d for k in sorted(keys) for d in _differences(a.get(k), b.get(k), f"{path}{k}.")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}{i}.")]
    if isinstance(a, float) and isinstance(b, float):
        return [] if math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-7) else [(path, a, b)]
    return [] if a == b else [(path, a, b)]


def _wait_for_checkpoint(process, folder, step, timeout=900):
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if os.path.isdir(folder) and any(d.isdigit() and int(d) >= step
                                         for d in os.listdir(folder)):
            return
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint >= {step} in {folder} (exit {process.poll()})")


@pytest.fixture(scope="module")
def data_and_reference(tmp_path_factory):
    """Prepared data (once, one process) and the run of one process with 4 devices."""
    root = tmp_path_factory.mktemp("multiprocess")
    data, reference = str(root / "data"), str(root / "one_process")
    subprocess.run(_main(str(root / "prepare"), data, "--config.jobs=prepare"), cwd=REPO,
                   env=_env(1), check=True, capture_output=True, timeout=600)
    subprocess.run(_main(reference, data, JOBS), cwd=REPO, env=_env(4), check=True,
                   capture_output=True, timeout=1200)
    return root, data, reference


def test_two_processes_stopped_by_sigterm_resume_to_the_numbers_of_one(data_and_reference):
    root, data, reference = data_and_reference
    workdir = str(root / "two_processes")
    runs = []

    def start():
        """The cluster, its output going to a file (a pipe nobody reads would block it)."""
        log = root / f"cluster_{len(runs)}.log"
        runs.append(log)
        return subprocess.Popen(_cluster(workdir, data), cwd=REPO, env=_env(1),
                                stdout=open(log, "w"), stderr=subprocess.STDOUT)

    def output():
        return runs[-1].read_text()

    # 1. SIGTERM to every process mid stage 1: they save one step they agree on and exit.
    cluster = start()
    _wait_for_checkpoint(cluster, os.path.join(workdir, "stage1", "checkpoints"), 2)
    cluster.send_signal(signal.SIGTERM)  # The launcher forwards it to both processes.
    cluster.wait(timeout=300)
    saved = re.findall(r"stage1: SIGTERM received, saved step (\d+)", output())
    assert cluster.returncode != 0 and len(saved) == 2, output()[-3000:]
    assert saved[0] == saved[1], "both processes saved the same step"
    assert not os.path.exists(os.path.join(workdir, "metrics", "stage1.json"))

    # 2. The rerun resumes and finishes; every recorded number equals the one-process run's.
    cluster = start()
    cluster.wait(timeout=1200)
    assert cluster.returncode == 0, output()[-3000:]
    assert "stage1: resumed at step" in output()
    for step in ("rec", "pretrain", "stage1", "stage2", "eval"):
        assert not _differences(_metrics(reference, step), _metrics(workdir, step)), step
    with open(os.path.join(reference, "metrics", "predictions_test.jsonl")) as f:
        expected = f.read()
    with open(os.path.join(workdir, "metrics", "predictions_test.jsonl")) as f:
        assert f.read() == expected


def _launcher():
    spec = importlib.util.spec_from_file_location("local_cluster",
                                                  os.path.join(REPO, "launch", "local_cluster.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Process 1 kills itself; process 0 ignores SIGTERM (as a process blocked in a collective
# would) and would sleep for ten minutes. Both first print what the launcher gave them.
_DIES = """
import os, signal, time
print(os.environ["JAX_PROCESS_ID"], os.environ["JAX_NUM_PROCESSES"], os.environ["XLA_FLAGS"],
      os.environ["JAX_CPU_COLLECTIVES_IMPLEMENTATION"], flush=True)
if os.environ["JAX_PROCESS_ID"] == "1":
    time.sleep(1)
    os.kill(os.getpid(), signal.SIGKILL)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
time.sleep(600)
"""


def test_a_killed_process_stops_the_others_and_sets_the_exit_code():
    out = io.StringIO()
    start = time.time()
    code = _launcher().run_cluster(2, [sys.executable, "-c", _DIES], devices=3, grace=2, out=out)
    assert code == 128 + signal.SIGKILL, out.getvalue()
    assert time.time() - start < 60, "the survivor was killed after the grace period"
    lines = out.getvalue().splitlines()
    for process in (0, 1):
        assert f"[{process}] {process} 2 --xla_force_host_platform_device_count=3 gloo" in lines
    assert "[launcher] process 1 exited with 137; stopping the others" in lines
