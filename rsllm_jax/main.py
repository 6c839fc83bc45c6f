"""The pipeline: parse a config, run the steps it lists, each resumable.

  python -m rsllm_jax.main --config configs/lastfm.py [--workdir DIR] [--config.x=y ...]

`config.jobs` is a comma-separated list of steps run in order. A step whose metrics file
`<workdir>/metrics/<step>.json` exists was completed (the file is written last) and is skipped,
so rerunning a killed pipeline resumes it. The metrics file also records the config sections
the step depends on; a workdir whose finished step used different values is refused rather
than mixed with new results.
"""

import dataclasses
import importlib
import json
import logging as std_logging
import os
import time

from absl import app, flags, logging
from ml_collections import config_flags


@dataclasses.dataclass(frozen=True)
class Step:
    """A pipeline step: `module:function(config, workdir) -> metrics dict`."""

    target: str
    depends_on: tuple  # Config sections whose values decide the step's output.

    def run(self, config, workdir):
        module, function = self.target.split(":")
        return getattr(importlib.import_module(module), function)(config, workdir)


# Imported lazily: `prepare` must not pay for importing the model stack.
STEPS = {
    "prepare": Step("rsllm_jax.data.prepare:run_step", ("data",)),
    "rec": Step("rsllm_jax.recommenders.train:run_step", ("data", "rec")),
    "pretrain": Step("rsllm_jax.training.pretrain:run_step",
                     ("data", "model", "prompts", "pretrain")),
    "stage1": Step("rsllm_jax.training.trainer:run_stage1",
                   ("data", "rec", "model", "pretrain", "prompts", "train", "stage1")),
    "stage2": Step("rsllm_jax.training.trainer:run_stage2",
                   ("data", "rec", "model", "pretrain", "prompts", "train", "stage1", "stage2")),
    "eval": Step("rsllm_jax.evaluation.evaluate:run_step",
                 ("data", "rec", "model", "pretrain", "prompts", "train", "stage1", "stage2",
                  "eval")),
}


def parse_jobs(jobs):
    """'prepare, rec' → ['prepare', 'rec'], rejecting unknown step names."""
    names = [name.strip() for name in jobs.split(",") if name.strip()]
    unknown = [name for name in names if name not in STEPS]
    if unknown:
        raise ValueError(f"unknown step(s) {unknown} in config.jobs; available: {list(STEPS)}")
    return names


def _sections(config, step):
    return {section: config[section].to_dict() if hasattr(config[section], "to_dict")
            else config[section] for section in step.depends_on}


def run_pipeline(config, workdir):
    """Runs every step of `config.jobs` not already done in `workdir`; returns their metrics."""
    primary = _is_primary()  # Only process 0 writes run files; every process computes.
    os.makedirs(os.path.join(workdir, "metrics"), exist_ok=True)
    if primary:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    results = {}
    for name in parse_jobs(config.jobs):
        step = STEPS[name]
        metrics_path = os.path.join(workdir, "metrics", f"{name}.json")
        sections = _sections(config, step)
        if os.path.exists(metrics_path):
            with open(metrics_path) as f:
                done = json.load(f)
            if done.get("config") != sections:
                raise ValueError(
                    f"{metrics_path}: step {name!r} was completed with a different config "
                    f"({', '.join(step.depends_on)}); use another --workdir or delete the file "
                    "to redo it")
            logging.info("step %s: done already (%s), skipping", name, metrics_path)
            results[name] = done["metrics"]
            continue
        logging.info("step %s: starting", name)
        start = time.time()
        metrics = step.run(config, workdir)
        record = dict(step=name, seconds=round(time.time() - start, 2), config=sections,
                      metrics=metrics)
        tmp = metrics_path + ".tmp"
        if primary:
            with open(tmp, "w") as f:
                json.dump(record, f, indent=2)
            os.replace(tmp, metrics_path)
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


def initialize_distributed(env=None):
    """Joins a multi-process run before any JAX computation; a no-op for one process.

    JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID
    name the processes explicitly (GPU hosts); RSLLM_DISTRIBUTED=1 lets JAX detect them
    (Cloud TPU pods, SLURM, Open MPI). Returns whether it initialised.
    """
    env = os.environ if env is None else env
    if "JAX_COORDINATOR_ADDRESS" in env and int(env.get("JAX_NUM_PROCESSES", "1")) > 1:
        import jax  # pylint: disable=g-import-not-at-top

        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"],
                                   int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"]))
        return True
    if env.get("RSLLM_DISTRIBUTED") == "1":
        import jax  # pylint: disable=g-import-not-at-top

        jax.distributed.initialize()
        return True
    return False


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietCheckpointing())
    config = FLAGS.config
    workdir = FLAGS.workdir or config.workdir
    initialize_distributed()
    results = run_pipeline(config, workdir)
    if "eval" in results or "rec" in results:
        from rsllm_jax import report

        print(report.results_table(workdir, backbones=True))


FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/lastfm.py.",
                                lock_config=True)
flags.DEFINE_string("workdir", "", "Output folder; default: config.workdir.")

if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
