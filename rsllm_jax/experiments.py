"""A table of the paper in one command: presets × seeds on one dataset, then the report.

  python -m rsllm_jax.experiments --config configs/demo.py --rows zero_shot,tallrec,llara,rsllm \
      --seeds 0,1,2 --out DIR [--llm_steps 600] [--config.x=y ...] [--<row>.config.x=y ...]

Every row × seed is a pipeline run (`python -m rsllm_jax.main`) in its own folder,
`DIR/<row>/seed<k>`, with `config.seed = k`; a killed command run again skips what finished
and resumes what did not. The steps every row shares run once, in `DIR/shared`: `prepare`, the
recommender (`rec`, whose item table every row reads) and, when the config pre-trains its base
(`config.pretrain.steps > 0`, the demo), `pretrain`, whose Hugging Face directory then is the
base of every row (`config.model.name`): the rows differ only in their method. `--llm_steps N`
gives every row the same number of LLM training steps (micro-batches), split evenly over its
stages; a note is printed when the rows' micro-batches differ in size.
`--config.x=y` overrides apply to every run, as in `rsllm_jax.main`; `--<row>.config.x=y` to
that row's runs only, after them (e.g. `--rsllm.config.stage1.max_steps=1500` beside
`--config.stage1.max_steps=6000`: the one-stage rows train in `stage1`). A row override may not
change what the rows share (`data`, `rec`, `pretrain`) or what the command sets itself.

At the end it prints the report's Markdown table (each row's mean ± std over its seeds, the
recommender beside them, then every two rows' differences paired by seed with their standard
errors), writes it to `DIR/results.md` and draws `DIR/hit_ratio.png` with error bars.
"""

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile

from rsllm_jax import cli, config_lists, report, run_paths

SHARED = "shared"
SHARED_JOBS = ("prepare", "rec", "pretrain")
STAGES = ("stage1", "stage2")
# What a row's own override may not change: the shared steps' sections (every row reads their
# outputs) and the fields this command sets for each run.
NOT_PER_ROW = ("data", "rec", "pretrain", "jobs", "seed", "workdir", "model.name",
               "prompts.item_embeddings")


def load_config(config_file, preset, overrides=()):
    """The config of `config_file` for `preset`, with `--config.x=y` overrides applied."""
    spec = importlib.util.spec_from_file_location("experiment_config", config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(preset)
    for override in overrides:
        key, _, value = override[len("--config."):].partition("=")
        node, *path = key.split(".")
        parent = config if not path else config[node]
        for name in path[:-1]:
            parent = parent[name]
        field = path[-1] if path else node
        if field not in parent:
            raise ValueError(f"{override}: the config has no field {key!r}")
        old = parent[field]
        parent[field] = (value.lower() in ("1", "true",
                                           "yes") if isinstance(old, bool) else type(old)(value))
    return config


def split_overrides(flags, rows):
    """(overrides of every run, {row: its own overrides}) from `--config.x=y` and
    `--<row>.config.x=y` flags, the row's given as `--config.x=y`; ValueError on anything else."""
    common, per_row = [], {row: [] for row in rows}
    for flag in flags:
        row, _, rest = flag[2:].partition(".config.")
        if flag.startswith("--config.") and "=" in flag:
            common.append(flag)
        elif flag.startswith("--") and row in per_row and rest and "=" in rest:
            key = rest.partition("=")[0]
            if any(key == f or key.startswith(f + ".") for f in NOT_PER_ROW):
                raise ValueError(f"{flag}: {key} is shared by the rows or set by this command; "
                                 f"give it to every row as --config.{key}=...")
            per_row[row].append("--config." + rest)
        else:
            raise ValueError(f"unrecognised argument {flag}: only --config.x=y overrides, or "
                             f"--<row>.config.x=y for a row of --rows ({', '.join(rows)}), "
                             "pass through")
    return common, per_row


def row_jobs(config):
    """The steps a row runs in its own folder: its LLM stages and the evaluation."""
    return [job for job in config_lists.names(config.jobs, "config.jobs") if job not in SHARED_JOBS]


def row_configs(config_file, rows, overrides=(), row_overrides=None):
    """{row: its config}, each preset of `config_file` with the overrides applied, then the
    row's own (`row_overrides`: {row: ['--config.x=y', ...]})."""
    row_overrides = row_overrides or {}
    return {
        row: load_config(config_file, row,
                         list(overrides) + row_overrides.get(row, []))
        for row in rows
    }


def llm_stages(config):
    """The LLM training stages a row runs (none for zero-shot)."""
    return [job for job in row_jobs(config) if job in STAGES]


def unequal_micro_batches(configs):
    """'tallrec 8, rsllm 32' when the trained rows' micro-batches (config.train.batch_size)
    differ, else ''. `--llm_steps` counts micro-batches, so such rows would train on different
    numbers of examples (on LastFM, LLaRA's optimiser takes 8 rows, the base config 32)."""
    sizes = {row: config.train.batch_size for row, config in configs.items() if llm_stages(config)}
    if len(set(sizes.values())) <= 1:
        return ""
    return ", ".join(f"{row} {size}" for row, size in sizes.items())


def _pipeline(config_arg, workdir, flags, log_path):
    """Runs one pipeline to completion (it skips its finished steps); stops on failure."""
    command = [
        sys.executable, "-m", "rsllm_jax.main", "--config", config_arg, "--workdir",
        os.fspath(workdir)
    ] + flags
    if run_paths.is_url(log_path):  # A log in a bucket: the run's output, appended after it.
        log_path = run_paths.as_path(log_path)
        with tempfile.TemporaryFile("w+") as log:
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
            log.seek(0)
            earlier = log_path.read_text() if log_path.exists() else ""
            log_path.write_text(earlier + log.read())
    else:
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        with open(log_path, "a") as log:
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed (exit {done.returncode}); its log: "
                         f"{log_path}")


def run(config_file, configs, seeds, out, overrides=(), llm_steps=0, row_overrides=None):
    """Runs the shared steps, every row × seed of `configs` ({row: config}, `row_configs`),
    and returns the report's rows. A row's own overrides (`row_overrides`) follow everything
    else on its command line, so they win (also over `llm_steps`)."""
    row_overrides = row_overrides or {}
    shared = run_paths.as_path(out) / SHARED
    base = load_config(config_file, "rsllm", overrides)
    pretrained = base.pretrain.steps > 0
    jobs = [job for job in SHARED_JOBS if job != "pretrain" or pretrained]
    print(f"shared steps ({', '.join(jobs)}) in {shared}", flush=True)
    _pipeline(f"{config_file}:rsllm", shared,
              list(overrides) + [f"--config.jobs={','.join(jobs)}"], shared / "log.txt")
    shared_flags = [
        f"--config.data.dir={run_paths.absolute(shared / 'data')}",
        "--config.prompts.item_embeddings="
        f"{run_paths.absolute(run_paths.item_embeddings_path(shared))}"
    ]
    if pretrained:
        base_dir = run_paths.pretrained_hf_path(shared)
        shared_flags += [f"--config.model.name={base_dir}", "--config.pretrain.steps=0"]
    run_dirs = []
    for row, config in configs.items():
        flags = [f"--config.jobs={','.join(row_jobs(config))}"]
        stages = llm_stages(config)
        if llm_steps and stages:
            flags += [f"--config.{s}.max_steps={llm_steps // len(stages)}" for s in stages]
        flags += row_overrides.get(row, [])
        for seed in seeds:
            workdir = run_paths.as_path(out) / row / f"seed{seed}"
            print(f"{row} seed {seed}: {workdir}", flush=True)
            _pipeline(f"{config_file}:{row}", workdir,
                      list(overrides) + shared_flags + flags + [f"--config.seed={seed}"],
                      workdir / "log.txt")
            run_dirs.append(workdir)
    return report.collect_rows([os.fspath(d) for d in [shared] + run_dirs])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="dataset config, e.g. configs/demo.py")
    parser.add_argument("--rows", required=True,
                        help="comma-separated presets (configs/presets.py), e.g. tallrec,rsllm")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--llm_steps", type=int, default=0,
        help="LLM training steps of every row, split over its stages (0: each "
        "preset's own)")
    args, flags = parser.parse_known_args(argv)
    from configs import presets  # pylint: disable=g-import-not-at-top

    rows = config_lists.names(args.rows, "--rows")
    unknown = [r for r in rows if r not in presets.PRESETS]
    if unknown:
        parser.error(f"unknown rows {unknown}; presets: {', '.join(presets.PRESETS)}")
    try:
        overrides, row_overrides = split_overrides(flags, rows)
    except ValueError as error:
        parser.error(str(error))
    seeds = list(config_lists.ints(args.seeds, "--seeds"))
    configs = row_configs(args.config, rows, overrides, row_overrides)
    unequal = args.llm_steps and unequal_micro_batches(configs)
    if unequal:
        print(
            f"note: --llm_steps counts micro-batches, and the rows' differ ({unequal} rows, "
            "config.train.batch_size): they train on different numbers of examples. Set "
            "--config.train.batch_size and --config.train.accumulation_steps to equalise.",
            flush=True)
    table_rows = run(args.config, configs, seeds, args.out, overrides, args.llm_steps,
                     row_overrides)
    table = report.format_table(table_rows)
    print(table, end="")
    (run_paths.as_path(args.out) / "results.md").write_text(table)
    report.plot_hit_ratio(table_rows, run_paths.as_path(args.out) / "hit_ratio.png")


if __name__ == "__main__":
    with cli.one_line_errors():
        main()
