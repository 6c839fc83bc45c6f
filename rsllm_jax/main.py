"""The pipeline: parse a config, run the steps it lists, each resumable.

  python -m rsllm_jax.main --config configs/lastfm.py [--workdir DIR] [--config.x=y ...]

`config.jobs` is a comma-separated list of steps run in order. A step whose metrics file
`<workdir>/metrics/<step>.json` exists was completed (the file is written last) and is skipped,
so rerunning a killed pipeline resumes it. The metrics file also records the config sections
the step depends on; a workdir whose finished step used different values is refused, before
anything runs, rather than mixed with new results. Bad input is reported on one line
(rsllm_jax/cli.py; RSLLM_TRACEBACK=1 shows the traceback).
"""

import dataclasses
import importlib
import json
import logging as std_logging
import os
import time

from absl import app, flags, logging
from ml_collections import config_flags

from rsllm_jax import cli, compilation_cache, config_lists, run_paths


@dataclasses.dataclass(frozen=True)
class Step:
    """A pipeline step: `module:function(config, workdir) -> metrics dict`."""

    target: str
    depends_on: tuple  # Config sections whose values decide the step's output.

    def run(self, config, workdir):
        module, function = self.target.split(":")
        return getattr(importlib.import_module(module), function)(config, workdir)


# Imported lazily: `prepare` must not pay for importing the model stack. `seed` (data order,
# initialisation, dropout) decides the LLM steps; `prepare` and `rec` have their own seeds in
# config.data and config.rec, so runs over several `seed`s can share their outputs.
STEPS = {
    "prepare": Step("rsllm_jax.data.prepare:run_step", ("data", )),
    "rec": Step("rsllm_jax.recommenders.train:run_step", ("data", "rec")),
    "pretrain": Step("rsllm_jax.training.pretrain:run_step",
                     ("seed", "data", "model", "prompts", "pretrain")),
    "stage1": Step("rsllm_jax.training.trainer:run_stage1",
                   ("seed", "data", "rec", "model", "pretrain", "prompts", "train", "stage1")),
    "stage2": Step(
        "rsllm_jax.training.trainer:run_stage2",
        ("seed", "data", "rec", "model", "pretrain", "prompts", "train", "stage1", "stage2")),
    "eval": Step("rsllm_jax.evaluation.evaluate:run_step",
                 ("seed", "data", "rec", "model", "pretrain", "prompts", "train", "stage1",
                  "stage2", "eval")),
}
assert tuple(STEPS) == run_paths.STEP_NAMES
LLM_STEPS = ("pretrain", "stage1", "stage2", "eval")


def parse_jobs(jobs):
    """'prepare, rec' → ['prepare', 'rec'], rejecting unknown step names."""
    names = config_lists.names(jobs, "config.jobs")
    unknown = [name for name in names if name not in STEPS]
    if unknown:
        raise ValueError(f"unknown step(s) {unknown} in config.jobs; available: {list(STEPS)}")
    return list(names)


def config_sections(config, step):
    """The config sections `step` depends on, as plain dicts: what its metrics file records."""
    return {
        section: config[section].to_dict()
        if hasattr(config[section], "to_dict") else config[section]
        for section in step.depends_on
    }


class _Absent:

    def __repr__(self):
        return "(none)"


def _differences(recorded, current, prefix=""):
    """'a.b: 1 → 2' for each field that differs between two nested dicts."""
    out = []
    for key in sorted(set(recorded) | set(current), key=str):
        old, new = recorded.get(key, _Absent()), current.get(key, _Absent())
        if isinstance(old, dict) and isinstance(new, dict):
            out += _differences(old, new, f"{prefix}{key}.")
        elif old != new:
            out.append(f"{prefix}{key}: {old!r} → {new!r}")
    return out


def evaluates_test(config):
    """Whether the eval step evaluates the test split, whose record (metrics/eval.json) the
    report's tables read."""
    return config.eval.split == "test"


def record_path(config, workdir, name):
    """Where step `name` records its metrics: metrics/<name>.json, and for the eval step on
    another split than test metrics/eval_<split>.json, so that evaluating a finished run on
    the validation split (to choose between runs) neither overwrites nor is refused by its
    test record."""
    if name == "eval" and not evaluates_test(config):
        return run_paths.metrics_path(workdir, f"eval_{config.eval.split}")
    return run_paths.metrics_path(workdir, name)


def _fill_missing(recorded, defaults):
    """`recorded` (nested dicts) with each field it lacks and `defaults` has taken from there."""
    out = dict(recorded)
    for key, default in defaults.items():
        if key not in out:
            out[key] = default
        elif isinstance(out[key], dict) and isinstance(default, dict):
            out[key] = _fill_missing(out[key], default)
    return out


def _record_defaults():
    """Every config field's default, for the fields a step's record lacks: added since the step
    ran, each had its default's effect (a new field's default keeps the behaviour from before
    it existed). The prepare settings' defaults are the package's, as for a prepared folder's
    manifest; the others are configs/base.py's, importable when the command runs from the
    repository root as every config file of configs/ requires. Without it, a record that lacks
    any other field is refused as changed."""
    from rsllm_jax.data import storage  # pylint: disable=g-import-not-at-top # Imports TFDS.

    try:
        from configs import base  # pylint: disable=g-import-not-at-top
        defaults = json.loads(base.get_config().to_json_best_effort())
    except ImportError:
        defaults = {}
    return _fill_missing({"data": storage.default_settings()}, defaults)


def _finished_steps(config, workdir, names):
    """{step: recorded metrics} of the steps of `names` done in `workdir`, after checking that
    each was done with the config sections it depends on (ValueError naming the fields)."""
    done, defaults = {}, None
    for name in names:
        metrics_path = record_path(config, workdir, name)
        if not metrics_path.exists():
            continue
        try:
            record = json.loads(metrics_path.read_text())
        except ValueError as e:
            record = e
        if not isinstance(record, dict) or "metrics" not in record:
            problem = record if isinstance(record, ValueError) else "no metrics"
            raise ValueError(f"{metrics_path}: corrupt metrics file ({problem}); delete it to "
                             f"redo step {name!r}")
        recorded = record.get("config")
        recorded = recorded if isinstance(recorded, dict) else {}
        defaults = _record_defaults() if defaults is None else defaults  # Once, when needed.
        sections = STEPS[name].depends_on
        recorded = _fill_missing(recorded, {s: defaults[s] for s in sections if s in defaults})
        current = json.loads(json.dumps(config_sections(config, STEPS[name])))
        changed = _differences(recorded, current)
        if changed:
            raise ValueError(
                f"{metrics_path}: step {name!r} was completed with a different config "
                f"({'; '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}); use another "
                "--workdir or delete the file to redo it")
        done[name] = record["metrics"]
    return done


def check_config(config, names):
    """Refuses settings that can only fail later, before any step runs."""
    if set(names) & set(LLM_STEPS):
        from rsllm_jax.parallel import layouts, mesh  # pylint: disable=g-import-not-at-top

        layouts.mesh_shape(config.mesh)
        mesh.get_rules(config.mesh.rules)


def run_pipeline(config, workdir):
    """Runs every step of `config.jobs` not already done in `workdir`; returns their metrics.

    Every finished step's recorded config is checked before anything runs or is written, so a
    refused run leaves the workdir (and its config.json, which the report reads) as it was.
    """
    names = parse_jobs(config.jobs)
    check_config(config, names)
    for folder in (workdir, config.data.dir, config.prompts.item_embeddings):
        run_paths.check_store(folder)
    finished = _finished_steps(config, workdir, names)
    primary = _is_primary()  # Only process 0 writes run files; every process computes.
    if primary:
        run_paths.write_text(
            run_paths.as_path(workdir) / "config.json", config.to_json_best_effort(indent=2))
    results = {}
    for name in names:
        step = STEPS[name]
        metrics_path = record_path(config, workdir, name)
        if name in finished:
            logging.info("step %s: done already (%s), skipping", name, metrics_path)
            results[name] = finished[name]
            continue
        logging.info("step %s: starting", name)
        start = time.time()
        metrics = step.run(config, workdir)
        record = dict(step=name, seconds=round(time.time() - start, 2),
                      config=config_sections(config, step), metrics=metrics)
        if primary:
            run_paths.write_text(metrics_path, json.dumps(record, indent=2))
        _sync_processes(f"step {name} done")  # The next step may read what process 0 wrote.
        logging.info("step %s: finished in %.1fs, metrics in %s", name, record["seconds"],
                     metrics_path)
        results[name] = metrics
    return results


class _QuietCheckpointing(std_logging.Filter):
    """Drops orbax's per-save INFO chatter so the pipeline's own progress lines stay readable."""

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def _is_primary():
    import jax  # pylint: disable=g-import-not-at-top

    return jax.process_index() == 0


def _sync_processes(name):
    from rsllm_jax.parallel import mesh  # pylint: disable=g-import-not-at-top

    mesh.sync_processes(name)


def initialize_distributed(env=None):
    """Joins a multi-process run before any JAX computation; a no-op for one process.

    JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID
    name the processes explicitly (GPU hosts); RSLLM_DISTRIBUTED=1 lets JAX detect them
    (Cloud TPU pods, SLURM, Open MPI). RSLLM_HEARTBEAT_TIMEOUT (seconds, default JAX's 100):
    how soon the others stop when one process dies. Returns whether it initialised.
    """
    env = os.environ if env is None else env
    explicit = "JAX_COORDINATOR_ADDRESS" in env and int(env.get("JAX_NUM_PROCESSES", "1")) > 1
    if not explicit and env.get("RSLLM_DISTRIBUTED") != "1":
        return False
    import jax  # pylint: disable=g-import-not-at-top

    kwargs = dict(heartbeat_timeout_seconds=int(env.get("RSLLM_HEARTBEAT_TIMEOUT", "100")))
    if explicit:
        kwargs.update(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                      num_processes=int(env["JAX_NUM_PROCESSES"]),
                      process_id=int(env["JAX_PROCESS_ID"]))
    jax.distributed.initialize(**kwargs)
    return True


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietCheckpointing())
    config = FLAGS.config
    workdir = FLAGS.workdir or config.workdir
    compilation_cache.enable()
    initialize_distributed()
    results = run_pipeline(config, workdir)
    if not _is_primary():
        return
    if "eval" in results and not evaluates_test(config):
        print(
            f"eval on {config.eval.split}: "
            f"{json.dumps(results['eval'], indent=1)}\n(in {record_path(config, workdir, 'eval')})")
    elif "eval" in results or "rec" in results:
        from rsllm_jax import report

        print(report.results_table(workdir, backbones=True))


FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/lastfm.py.",
                                lock_config=True)
flags.DEFINE_string("workdir", "", "Output folder; default: config.workdir.")

if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    with cli.one_line_errors(config_flag=True):
        app.run(main)
