"""Where a pipeline run keeps its files: every path inside a workdir (`--workdir`), in one
place. A leaf module: it imports nothing of the package, so every layer can use it."""

import os

# The pipeline's steps (rsllm_jax/main.py), in order; each records `metrics/<step>.json`.
STEP_NAMES = ("prepare", "rec", "pretrain", "stage1", "stage2", "eval")
STAGES = ("stage1", "stage2")  # The LLM stages, in training order.


def data_dir(config, workdir):
    """Where a pipeline keeps its prepared data: config.data.dir, else <workdir>/data."""
    return config.data.dir or os.path.join(workdir, "data")


def metrics_path(workdir, step):
    """A finished step's record (its metrics and the config sections it used)."""
    return os.path.join(workdir, "metrics", f"{step}.json")


def predictions_path(workdir, split):
    """The `eval` step's per-row predictions."""
    return os.path.join(workdir, "metrics", f"predictions_{split}.jsonl")


def item_embeddings_path(workdir):
    """Where the rec step leaves the item-embedding table the LLM steps load."""
    return os.path.join(workdir, "rec", "item_embeddings.npy")


def item_table_path(config, workdir):
    """The item-embedding table a run reads: config.prompts.item_embeddings, else the rec
    step's."""
    return config.prompts.item_embeddings or item_embeddings_path(workdir)


def pretrained_path(workdir):
    """Where the `pretrain` step leaves the base's parameters (orbax)."""
    return os.path.abspath(os.path.join(workdir, "pretrain", "final"))


def pretrained_hf_path(workdir):
    """The pre-trained base as a Hugging Face Llama directory."""
    return os.path.abspath(os.path.join(workdir, "pretrain", "hf"))


def stage_dir(workdir, stage):
    return os.path.join(workdir, stage)


def final_path(stage_dir):
    """Where a stage leaves its kept trainable parameters (stage 2 and `eval` read them)."""
    return os.path.abspath(os.path.join(stage_dir, "final"))


def best_path(stage_dir):
    """The best epoch's trainable parameters so far (epoch selection)."""
    return os.path.abspath(os.path.join(stage_dir, "best"))


def checkpoints_dir(run_dir):
    """The resumable checkpoints of a training run (rec seed, pretrain, stage)."""
    return os.path.join(run_dir, "checkpoints")
