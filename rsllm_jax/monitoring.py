"""What a person watching a run sees: metric files and TensorBoard curves, progress bars with
an ETA, and profiler traces of chosen steps.

Every pipeline step that trains or evaluates writes its scalars through one `MetricWriter`:
`<folder>/metrics.jsonl` (one JSON object per line, `{"step": n, "time": t, ...}`) and
TensorBoard event files in `<folder>/tensorboard` (tensorboardX: no TensorFlow), on process 0
only, where the folder is the step's own (`<workdir>/stage1`, `<workdir>/rec/<model>_<loss>/
seed_<n>`, ...); `tensorboard --logdir <workdir>` shows the curves of every step.
"""

import json
import math
import os
import shutil
import sys
import tempfile
import time

import jax
import tqdm

from rsllm_jax import run_paths


class MetricWriter:
    """Scalar metrics of one training or evaluation run, kept in `folder`.

    Values are numbers or nested dicts of numbers (flattened to "a/b" names); non-numbers are
    skipped. A resumed run passes `resume_step`: lines past it (steps that will be run again)
    are dropped, so the file holds each step once. Other processes write nothing.
    """

    def __init__(self, folder, resume_step=None):
        self._enabled = jax.process_index() == 0
        self._jsonl, self._events = None, None
        if not self._enabled:
            return
        # A folder in a bucket is written through a local one, uploaded at most once a
        # minute and at close: objects in a store cannot be appended to.
        self._folder = run_paths.as_path(folder)
        self._remote = run_paths.is_url(folder)
        local = tempfile.mkdtemp(prefix="rsllm_metrics_") if self._remote else os.fspath(folder)
        self._local, self._uploaded = local, time.time()
        os.makedirs(local, exist_ok=True)
        path = os.path.join(local, "metrics.jsonl")
        if self._remote and resume_step is not None and (self._folder / "metrics.jsonl").exists():
            (self._folder / "metrics.jsonl").copy(run_paths.as_path(path), overwrite=True)
        if resume_step is not None and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                kept = [
                    line for line in f
                    if _step_of(line) is not None and _step_of(line) <= resume_step
                ]
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(kept)
        elif resume_step is None:  # A fresh run of this step: old curves are not its own.
            for old in (self._folder / "metrics.jsonl", self._folder / "tensorboard"):
                if old.exists():
                    old.rmtree() if old.is_dir() else old.unlink()
        self._jsonl = open(path, "a", encoding="utf-8")  # pylint: disable=consider-using-with
        import tensorboardX  # pylint: disable=g-import-not-at-top  (slow to import)

        self._events = tensorboardX.SummaryWriter(
            os.path.join(local, "tensorboard"),
            purge_step=None if resume_step is None else resume_step + 1)

    def write(self, step, metrics, prefix=""):
        """Records `metrics` at `step`, each name under `prefix` ("train", "val", ...)."""
        if not self._enabled:
            return
        flat = {}
        _flatten(metrics, prefix, flat)
        self._jsonl.write(
            json.dumps(dict(step=int(step), time=round(time.time(), 3), **flat)) + "\n")
        self._jsonl.flush()
        for key, value in flat.items():
            self._events.add_scalar(key, value, int(step))
        self._events.flush()
        if self._remote and time.time() - self._uploaded > 60:
            self._upload()

    def _upload(self):
        run_paths.copy_tree(self._local, self._folder)
        self._uploaded = time.time()

    def close(self):
        if self._jsonl is not None:
            self._jsonl.close()
            self._events.close()
            self._jsonl = self._events = None
            if self._remote:
                self._upload()
                shutil.rmtree(self._local, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _step_of(line):
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _flatten(metrics, prefix, out):
    for key, value in metrics.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            _flatten(value, name, out)
        elif isinstance(value, (bool, str)) or value is None:
            continue
        else:
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(number):  # JSON has no NaN; a non-finite loss stops the run.
                out[name] = number


def progress(total, description, initial=0, unit="step"):
    """A progress bar with rate and ETA (tqdm) on process 0 when stderr is a terminal; silent
    otherwise (logs and CI), where the log lines say the same. Update it with `.update(n)`."""
    quiet = jax.process_index() != 0 or not sys.stderr.isatty()
    return tqdm.tqdm(total=total, initial=initial, desc=description, unit=unit, disable=quiet,
                     dynamic_ncols=True, leave=False, mininterval=1.0)


def parse_profile_steps(value):
    """`config.train.profile_steps`: "" (off) or "a,b", the first and last step traced."""
    from rsllm_jax import config_lists  # pylint: disable=g-import-not-at-top

    steps = config_lists.ints(value, "config.train.profile_steps")
    if not steps:
        return None
    if len(steps) != 2 or not 0 <= steps[0] <= steps[1]:
        raise ValueError(f"config.train.profile_steps={value!r}: expected 'first,last' with "
                         "0 <= first <= last (steps of the run, as the log counts them)")
    return steps


class Profiler:
    """A `jax.profiler` trace of the updates that end in steps [first, last] of a run
    (`config.train.profile_steps`), written to `log_dir` for TensorBoard's profile plugin or
    Perfetto (ui.perfetto.dev opens the `*.trace.json.gz` in `log_dir/plugins/profile/*/`)."""

    def __init__(self, steps, log_dir):
        self._window = steps
        self._log_dir = log_dir  # In a bucket: traced locally, uploaded when the trace stops.
        self._local = None
        self._active = False

    def before_update(self, next_step):
        """Starts tracing if the update about to run ends at a step inside the window."""
        if self._window is None or self._active:
            return
        first, last = self._window
        if first <= next_step <= last:
            if run_paths.is_url(self._log_dir):
                self._local = tempfile.mkdtemp(prefix="rsllm_profile_")
            else:
                self._local = os.fspath(self._log_dir)
                os.makedirs(self._local, exist_ok=True)
            jax.profiler.start_trace(self._local)
            self._active = True

    def after_update(self, step, outputs):
        """Stops after the update ending at `step` if it was the window's last (waiting for
        `outputs`, so the trace holds the device work)."""
        if self._active and step >= self._window[1]:
            jax.block_until_ready(outputs)
            self._stop()
            self._window = None

    def _stop(self):
        jax.profiler.stop_trace()
        self._active = False
        if run_paths.is_url(self._log_dir):
            run_paths.copy_tree(self._local, self._log_dir)
            shutil.rmtree(self._local, ignore_errors=True)

    def close(self):
        if self._active:
            self._stop()
