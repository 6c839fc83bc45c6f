"""Our on-disk format: a TFDS array_record dataset, the catalogue, and a manifest.

A prepared folder holds
  dataset.json     manifest: dataset, sizes, settings it was built with, per-split counts
  catalogue.json   item id → title (see catalogue.py)
  tfds/...         a TFDS `GeneratorBasedBuilder` output in array_record format
The manifest is written last, so its presence means the folder is complete. Reading uses
`tfds.builder_from_directory(...).as_data_source(split)`: random access, no TensorFlow.

The folder may be an object-store URL (run_paths). array_record writes local files only, so
such a folder is built in a local temporary folder and uploaded; its reader reads local files
and `gs://` objects.
"""

import json
import os
import tempfile

import numpy as np
import tensorflow_datasets as tfds

from rsllm_jax import run_paths
from rsllm_jax.data.catalogue import Catalogue, catalogue_path
from rsllm_jax.data.errors import DataError
from rsllm_jax.data.sources import MAX_HISTORY
from rsllm_jax.data.candidates import NUM_CANDIDATES

FORMAT_VERSION = 1
MANIFEST = "dataset.json"
# "world": training-like rows a base LLM may be pre-trained on (synthetic data only).
SPLITS = ("train", "val", "test", "world")
# Splits whose rows are every prefix of a sequence: shuffled, candidates drawn per epoch.
TRAINING_SPLITS = ("train", "world")
# Stored per row: (shape, dtype). Train rows store -1 candidates: the pipeline redraws them.
FIELD_SPECS = {
    "history": ((MAX_HISTORY, ), np.int32),  # Oldest first, right-padded with the pad id.
    "history_len": ((), np.int32),
    "target": ((), np.int32),
    "row_id": ((), np.int64),  # Position in the source split: stable across runs.
    "sequence": ((), np.int32),  # Which user sequence of the split the row comes from.
    "candidates": ((NUM_CANDIDATES, ), np.int32),
}
FIELDS = tuple(FIELD_SPECS)


class RecSequences(tfds.core.GeneratorBasedBuilder):
    """Sequential-recommendation rows: history, target, stable row id, candidates."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "History window 10, 20 candidates, array_record."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name=name) for name in ("lastfm", "movielens", "steam", "synthetic")
    ]

    def __init__(self, *, rows=None, **kwargs):
        self._rows = rows  # {split: {field: array}}, only when building.
        super().__init__(**kwargs)

    def _info(self):
        features = tfds.features.FeaturesDict({
            field: tfds.features.Tensor(shape=shape, dtype=dtype)
            for field, (shape, dtype) in FIELD_SPECS.items()
        })
        # Keep source order: row ids stay meaningful and the pipeline shuffles by seed.
        return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

    def _split_generators(self, dl_manager):
        # TFDS cannot store an empty split; the manifest still records its (zero) counts.
        return {
            split: self._generate_examples(columns)
            for split, columns in self._rows.items() if len(columns["target"])
        }

    def _generate_examples(self, columns):
        for i in range(len(columns["target"])):
            yield i, {field: columns[field][i] for field in FIELDS}


def write_prepared(out_dir, dataset, catalogue, columns_by_split, manifest):
    """Writes the TFDS dataset, then the catalogue, then the manifest (completion marker)."""
    out_dir = run_paths.as_path(out_dir)
    tfds_root = out_dir / "tfds"
    if tfds_root.exists():
        tfds_root.rmtree()  # A partial earlier build is redone.
    with run_paths.local_folder(tfds_root) as local_root, \
            tempfile.TemporaryDirectory(prefix="rsllm_tfds_") as downloads:
        builder = RecSequences(rows=columns_by_split, config=dataset, data_dir=local_root,
                               file_format="array_record")
        builder.download_and_prepare(download_dir=downloads)  # Nothing is downloaded.
        tfds_dir = os.path.join("tfds", os.path.relpath(builder.data_dir, local_root))
    catalogue.save(catalogue_path(out_dir))
    manifest = dict(manifest, format_version=FORMAT_VERSION, tfds_dir=tfds_dir)
    run_paths.write_text(out_dir / MANIFEST, json.dumps(manifest, indent=2))


def default_settings():
    """Everything that changes the prepared output (data/prepare.py); stored in the manifest."""
    return dict(
        min_history=3, candidate_seed=0, exclude_empty_titles=True, distinct_candidate_titles=False,
        movielens_split="llara", movielens_titles="clean", movielens_min_rating=3, split_seed=0,
        train_file="", synthetic=dict(seed=0, num_items=300, num_users=600, num_genres=10,
                                      min_length=6, max_length=30, genre_titles=False,
                                      items_per_title=1, world_users=0))


def with_defaults(settings):
    """`settings` completed with `default_settings()` where it names fewer: the settings a
    prepare call asks for, or a manifest written before a setting existed (that setting then
    had its default's effect)."""
    merged = dict(default_settings(), **settings)
    merged["synthetic"] = dict(default_settings()["synthetic"], **settings.get("synthetic", {}))
    return merged


def read_manifest(data_dir):
    """The manifest of a prepared folder, or None when the folder is not (completely) prepared.
    Its settings are complete (`with_defaults`), however old the folder."""
    path = run_paths.as_path(data_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise DataError(path, f"corrupt manifest ({e})") from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            path, f"format version {manifest.get('format_version')}, this code reads "
            f"{FORMAT_VERSION}: prepare the data again")
    return dict(manifest, settings=with_defaults(manifest.get("settings", {})))


class PreparedDataset:
    """Read access to a prepared folder: manifest, catalogue and one data source per split."""

    def __init__(self, data_dir):
        self.data_dir = data_dir
        manifest = read_manifest(data_dir)
        if manifest is None:
            raise DataError(
                data_dir, f"not a prepared dataset (no {MANIFEST}); run the prepare "
                "step first")
        self.manifest = manifest
        self.catalogue = Catalogue.load(catalogue_path(data_dir))
        self._builder = tfds.builder_from_directory(
            os.fspath(run_paths.as_path(data_dir) / manifest["tfds_dir"]))
        self._sources = {}
        self._whole_splits = {}  # Decoded once: several iterators (seeds, epochs) share them.

    @property
    def name(self):
        return self.manifest["dataset"]

    @property
    def splits(self):
        """The splits that hold rows."""
        return tuple(s for s in SPLITS if self.manifest["splits"].get(s, {}).get("rows"))

    def source(self, split):
        """A random-access TFDS data source over one split; a clear error if it is absent."""
        if split not in self.manifest["splits"]:
            raise DataError(
                self.data_dir, f"split {split!r} was not prepared (the source folder "
                f"had no file for it); prepared splits: {list(self.splits)}")
        if split not in self.splits:
            raise DataError(
                self.data_dir, f"split {split!r} has no rows left after the "
                f"min_history={self.manifest['settings']['min_history']} filter")
        if split not in self._sources:
            try:
                self._sources[split] = self._builder.as_data_source(split=split)
            except (RuntimeError, OSError, ValueError) as e:
                raise self._corrupt(split, e) from e
        return self._sources[split]

    def _corrupt(self, split, error):
        """A DataError naming the split's shard file(s) and what the reader found."""
        folder = run_paths.as_path(self.data_dir) / self.manifest["tfds_dir"]
        pattern = f"*-{split}.array_record*"
        shards = sorted(os.fspath(shard) for shard in folder.glob(pattern))
        where = shards[0] if len(shards) == 1 else os.fspath(folder / pattern)
        problem = " ".join(str(error).split())
        return DataError(
            where, f"corrupt {split} data ({problem}); prepare the data again "
            "into a new folder")

    def num_rows(self, split):
        return len(self.source(split))

    def read(self, split, indices=None):
        """Rows as a dict of stacked NumPy arrays (all rows, decoded once, when `indices` is
        None; treat those arrays as read-only)."""
        if indices is None:
            if split not in self._whole_splits:
                self._whole_splits[split] = self._decode(split, range(self.num_rows(split)))
            return dict(self._whole_splits[split])
        return self._decode(split, indices)

    def _decode(self, split, indices):
        indices = [int(i) for i in indices]
        try:
            records = self.source(split).__getitems__(indices)
        except (RuntimeError, OSError, ValueError) as e:
            raise self._corrupt(split, e) from e
        missing = [
            i for i, r in zip(indices, records)
            if r is None or any(r.get(field) is None for field in FIELDS)
        ]
        if missing:  # A truncated shard reads as empty records past the cut.
            raise self._corrupt(split, f"row {missing[0]} and {len(missing) - 1} more cannot be "
                                "read")
        return {
            field: np.asarray([r[field] for r in records], dtype).reshape((-1, ) + shape)
            for field, (shape, dtype) in FIELD_SPECS.items()
        }
