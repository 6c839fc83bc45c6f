"""The item-embedding table handed to the LLM stages: `<name>.npy` plus `<name>.json`.

The .npy holds float32 (num_items + 1, dim): row i is item i, the last row (index pad_id ==
num_items) is padding and saved as zeros. The .json records what the table is and where it
came from; `load_item_embeddings` checks the two agree. The LLM stages use only these raw
rows (as in LLaRA), never contextual states; `load_item_table` and `preload_table` give a run
the table its item formats read.
"""

import json
import os

from absl import logging
import jax
import numpy as np

from rsllm_jax import run_paths
from rsllm_jax.prompts import templates

FORMAT = "rsllm_jax.item_embeddings.v1"


def _paths(path):
    path = os.fspath(path)
    stem = path[:-4] if path.endswith(".npy") else path
    return run_paths.as_path(stem + ".npy"), run_paths.as_path(stem + ".json")


def _check_finite(table, what):
    bad = np.flatnonzero(~np.isfinite(table).all(axis=1))
    if len(bad):
        raise ValueError(f"{what}: {len(bad)} row(s) hold NaN or infinite values (first: item "
                         f"{bad[0]}); such rows would score every item NaN")


def save_item_embeddings(path, table, *, num_items, model, source):
    """Writes `table` (num_items + 1, dim) with its padding row zeroed; returns the .npy path
    (a str)."""
    table = np.array(table, np.float32)
    if table.ndim != 2 or table.shape[0] != num_items + 1:
        raise ValueError(f"item-embedding table of shape {table.shape}; expected "
                         f"({num_items + 1}, dim): {num_items} items plus the padding row")
    table[num_items] = 0.0  # The padding row never feeds a model: keep it neutral.
    _check_finite(table, f"item-embedding table from {source}")
    npy_path, json_path = _paths(path)
    if jax.process_index() != 0:  # Every process computes; process 0 writes the files.
        return os.fspath(npy_path)
    npy_path.parent.mkdir(parents=True, exist_ok=True)
    with npy_path.open("wb") as f:
        np.save(f, table)
    meta = dict(format=FORMAT, num_items=num_items, pad_id=num_items, padding_row=num_items,
                dim=int(table.shape[1]), model=model, source=source)
    json_path.write_text(json.dumps(meta, indent=2))
    return os.fspath(npy_path)


def load_item_embeddings(path, num_items=None):
    """(table, metadata) from `save_item_embeddings`'s files; `path` names the .npy (or the
    shared stem). `num_items`, when given, must match the table (the catalogue's size)."""
    npy_path, json_path = _paths(path)
    try:
        meta = json.loads(json_path.read_text())
    except OSError as e:
        raise ValueError(f"{json_path}: cannot read the item-embedding metadata "
                         f"({e.strerror})") from e
    except ValueError as e:
        raise ValueError(f"{json_path}: corrupt item-embedding metadata ({e})") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{json_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    try:
        with npy_path.open("rb") as f:
            table = np.load(f, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{npy_path}: cannot read the item-embedding table ({e})") from e
    expected = (meta["num_items"] + 1, meta["dim"])
    if table.shape != expected:
        raise ValueError(f"{npy_path}: table shape {table.shape}, but {json_path} says "
                         f"{expected}")
    _check_finite(table, npy_path)
    if num_items is not None and meta["num_items"] != num_items:
        raise ValueError(f"{npy_path}: table for {meta['num_items']} items, but the catalogue "
                         f"has {num_items}")
    return table, meta


# --- the table of a run ----------------------------------------------------------------------


def load_item_table(config, workdir, num_items, item_format):
    """The recommender's item-embedding table (num_items + 1, d); zeros when the format (one,
    or a list) has no behavioural tokens (the table is then never read)."""
    formats = [item_format] if isinstance(item_format, str) else list(item_format)
    if not set(formats) & set(templates.PLACEHOLDER_FORMATS):
        return np.zeros((num_items + 1, config.rec.hidden_size), np.float32)
    return read_item_table(config, workdir, num_items)


def read_item_table(config, workdir, num_items):
    """The run's item-embedding table (`run_paths.item_table_path`) as float32."""
    table, _ = load_item_embeddings(run_paths.item_table_path(config, workdir), num_items)
    return np.asarray(table, np.float32)


def preload_table(config, workdir, num_items):
    """The table for pre-loading IID rows, or None (logged) when the rec step has not written
    one: a text-ID stage may run without the recommender (`--config.jobs=prepare,stage1`). An
    explicit config.prompts.item_embeddings must exist."""
    path = run_paths.item_table_path(config, workdir)
    if not config.prompts.item_embeddings and not path.exists():
        logging.warning(
            "no recommender item table at %s: the [IID<n>] rows start random "
            "(run the rec step first to pre-load them)", path)
        return None
    return read_item_table(config, workdir, num_items)
