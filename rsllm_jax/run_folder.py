"""A finished pipeline run folder (the `--workdir` of `rsllm_jax.main`): its config and its
trained stages, for the commands that use a trained model (`export`, `recommend`).

The config is `config.json` (written by the pipeline) with the sections a stage recorded in
`metrics/<stage>.json` laid over it: those are the values that stage was trained with, even if
a later, refused invocation rewrote `config.json`. A stage is finished when its metrics file
and its kept parameters (`<stage>/final`) both exist.
"""

import json

import jax
import ml_collections
import orbax.checkpoint as ocp

from rsllm_jax import run_paths

AUTO = "auto"


def finished_stages(workdir):
    """The stages of `run_paths.STAGES` finished in `workdir`, in training order."""
    return [
        stage for stage in run_paths.STAGES if run_paths.metrics_path(workdir, stage).exists()
        and run_paths.final_path(run_paths.stage_dir(workdir, stage)).exists()
    ]


def resolve_stage(workdir, stage=AUTO):
    """`stage`, checked to be finished in `workdir`; `auto`: the last finished stage."""
    if not (run_paths.as_path(workdir) / "config.json").is_file():
        raise FileNotFoundError(f"{workdir}: no config.json; not a run folder of "
                                "rsllm_jax.main (its --workdir)")
    if stage not in (AUTO, *run_paths.STAGES):
        raise ValueError(f"unknown stage {stage!r}; expected one of {(AUTO, *run_paths.STAGES)}")
    done = finished_stages(workdir)
    if not done:
        raise FileNotFoundError(f"{workdir}: no finished stage (neither of {run_paths.STAGES} "
                                "has metrics/<stage>.json and <stage>/final); train one first")
    if stage == AUTO:
        return done[-1]
    if stage not in done:
        raise FileNotFoundError(f"{workdir}: stage {stage!r} is not finished (finished: "
                                f"{', '.join(done)})")
    return stage


def load_config(workdir, stage=None):
    """The run's ConfigDict; with `stage`, the sections that stage recorded take precedence."""
    path = run_paths.as_path(workdir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the run's config ({e})") from e
    if stage is not None:
        raw.update(json.loads(run_paths.metrics_path(workdir, stage).read_text()).get("config", {}))
    return ml_collections.ConfigDict(raw)


def set_mesh(config, mesh):
    """Overrides config.mesh with `mesh`: a preset name (`single`, `fsdp8`, ...) or a shape
    `data,fsdp,tensor`; empty keeps the run's."""
    if not mesh:
        return config
    if "," in mesh:
        config.mesh.preset, config.mesh.shape = "", mesh
    else:
        config.mesh.preset = mesh
    return config


def step_metrics(workdir, step):
    """The `metrics` of `metrics/<step>.json`, or None."""
    path = run_paths.metrics_path(workdir, step)
    if not path.exists():
        return None
    return json.loads(path.read_text())["metrics"]


def restore_trainable(workdir, stage, sharding=None):
    """The stage's kept trainable parameters ({"lora", "adapter"}), placed with `sharding`
    (default: the first device) whatever the layout they were saved from."""
    path = run_paths.final_path(run_paths.stage_dir(workdir, stage))
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    checkpointer = ocp.StandardCheckpointer()
    saved = checkpointer.metadata(path).item_metadata.tree
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                          saved)
    return checkpointer.restore(path, target)
