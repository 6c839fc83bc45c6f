"""Where a pipeline run keeps its files: every path inside a workdir (`--workdir`), in one
place, and the few file operations run files need. A leaf module: it imports nothing of the
package, so every layer can use it.

Paths are `etils.epath.Path`s. A workdir (or config.data.dir) is a local folder, relative or
absolute, or an object-store URL such as `gs://bucket/run` (what every host of a TPU pod sees);
every reader and writer of run files goes through these paths, so both work alike. Orbax and
TFDS take the URLs as they are; `local_folder` and `local_copy` serve the writers and readers
of local files only (array_record's writer, transformers, SentencePiece, memory maps).
"""

import atexit
import contextlib
import importlib.util
import os
import shutil
import tempfile

from etils import epath
import fsspec.config

# A run folder in a bucket is written by several clients: orbax's own (tensorstore), and every
# host of a pod. Directory listings that gcsfs or s3fs cached would hide their files.
for _protocol in ("gcs", "s3"):
    fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)

# The pipeline's steps (rsllm_jax/main.py), in order; each records `metrics/<step>.json`.
STEP_NAMES = ("prepare", "rec", "pretrain", "stage1", "stage2", "eval")
STAGES = ("stage1", "stage2")  # The LLM stages, in training order.


def is_url(path):
    """Whether `path` names an object in a store (`gs://...`, `s3://...`), not a local file."""
    return "://" in os.fspath(path)


# The object stores a run folder may be in, and the fsspec package epath reaches each through
# (no TensorFlow: epath's other way in). Only gs:// is tested (tests/test_object_store.py).
STORES = {"gs": "gcsfs", "s3": "s3fs"}


def check_store(path):
    """Refuses (ValueError naming `path`) a URL this machine cannot read or write: a scheme
    other than STORES', or one whose package is not installed. Local paths pass."""
    if not is_url(path):
        return
    scheme = os.fspath(path).split("://", 1)[0]
    if scheme not in STORES:
        raise ValueError(f"{path}: a run folder is a local path or a URL of "
                         f"{', '.join(s + '://' for s in STORES)}, not {scheme}://")
    if importlib.util.find_spec(STORES[scheme]) is None:
        extra = ' (pip install -e ".[gcs]")' if scheme == "gs" else ""
        raise ValueError(f"{path}: a {scheme}:// folder needs the {STORES[scheme]} package"
                         f"{extra}")


def as_path(path):
    """`path` (a str or path) as an `epath.Path`; a relative local path stays relative."""
    return epath.Path(path)


def absolute(path):
    """`path` as an absolute `epath.Path` (orbax wants one): a local path resolved against the
    working folder, a URL as it is."""
    return epath.Path(path) if is_url(path) else epath.Path(os.path.abspath(path))


def data_dir(config, workdir):
    """Where a pipeline keeps its prepared data: config.data.dir, else <workdir>/data."""
    return as_path(config.data.dir or as_path(workdir) / "data")


def metrics_path(workdir, step):
    """A finished step's record (its metrics and the config sections it used)."""
    return as_path(workdir) / "metrics" / f"{step}.json"


def predictions_path(workdir, split):
    """The `eval` step's per-row predictions."""
    return as_path(workdir) / "metrics" / f"predictions_{split}.jsonl"


def item_embeddings_path(workdir):
    """Where the rec step leaves the item-embedding table the LLM steps load."""
    return as_path(workdir) / "rec" / "item_embeddings.npy"


def item_table_path(config, workdir):
    """The item-embedding table a run reads: config.prompts.item_embeddings, else the rec
    step's."""
    return as_path(config.prompts.item_embeddings or item_embeddings_path(workdir))


def pretrained_path(workdir):
    """Where the `pretrain` step leaves the base's parameters (orbax)."""
    return absolute(as_path(workdir) / "pretrain" / "final")


def pretrained_hf_path(workdir):
    """The pre-trained base as a Hugging Face Llama directory."""
    return absolute(as_path(workdir) / "pretrain" / "hf")


def stage_dir(workdir, stage):
    return as_path(workdir) / stage


def final_path(stage_dir):
    """Where a stage leaves its kept trainable parameters (stage 2 and `eval` read them)."""
    return absolute(as_path(stage_dir) / "final")


def best_path(stage_dir):
    """The best epoch's trainable parameters so far (epoch selection)."""
    return absolute(as_path(stage_dir) / "best")


def checkpoints_dir(run_dir):
    """The resumable checkpoints of a training run (rec seed, pretrain, stage)."""
    return as_path(run_dir) / "checkpoints"


# --- writing run files -----------------------------------------------------------------------


def write_text(path, text):
    """Writes a whole run file so that no reader sees part of it: a local file through a
    temporary one renamed into place; an object in a store appears whole when its upload ends."""
    path = as_path(path)
    if is_url(path):
        path.write_text(text)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def copy_tree(source, destination):
    """Copies the folder `source` into `destination` (either may be a URL), file by file."""
    source, destination = as_path(source), as_path(destination)
    if not is_url(source) and not is_url(destination):
        shutil.copytree(source, destination, dirs_exist_ok=True)
        return
    destination.mkdir(parents=True, exist_ok=True)
    for child in source.iterdir():
        if child.is_dir():
            copy_tree(child, destination / child.name)
        else:
            child.copy(destination / child.name, overwrite=True)


@contextlib.contextmanager
def local_folder(path):
    """A local folder to write the files of the folder `path` into: `path` itself when it is
    local, else a temporary folder whose files are uploaded to `path` when the block ends
    without an error (for writers of local files only: array_record, transformers)."""
    if not is_url(path):
        os.makedirs(path, exist_ok=True)
        yield os.fspath(path)
        return
    with tempfile.TemporaryDirectory(prefix="rsllm_upload_") as local:
        yield local
        copy_tree(local, path)


def local_copy(path):
    """A local path with the contents of the file or folder `path`: `path` itself when it is
    local, else a copy in a temporary folder kept until the process ends (for readers of
    local files only: memory-mapped safetensors, GGUF, transformers)."""
    if not is_url(path):
        return os.fspath(path)
    path = as_path(path)
    local = tempfile.mkdtemp(prefix="rsllm_download_")
    atexit.register(shutil.rmtree, local, ignore_errors=True)
    target = os.path.join(local, path.name)
    if path.is_dir():
        copy_tree(path, target)
    else:
        path.copy(epath.Path(target))
    return target
