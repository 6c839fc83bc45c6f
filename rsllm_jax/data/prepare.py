"""The `prepare` step: raw LLaRA-format data (or the synthetic generator) → a prepared folder.

  python -m rsllm_jax.data.prepare --dataset lastfm --source DATA/lastfm/llara --out DIR

Sources:
  lastfm, steam  id2name.txt + train_data.df / Val_data.df / Test_data.df (whichever exist)
  movielens      u.item + u.data (+ LLaRA's Val_data.df / Test_data.df for split "llara"):
                 LLaRA's full train file is not public, so train is rebuilt from u.data for the
                 users in neither LLaRA's val nor test; split "raw" builds all three from u.data
  synthetic      generated (synthetic.py); --source is ignored
Rows with fewer than `min_history` history items are dropped (LLaRA's len_seq < 3 filter).
Val/test candidates are drawn once here from `candidate_seed` and stored with the rows.
"""

import dataclasses
import hashlib
import os
import tempfile
import time

from absl import app, flags, logging
import numpy as np

from rsllm_jax import run_paths
from rsllm_jax.data import candidates, catalogue as catalogue_lib, sources, storage, synthetic
from rsllm_jax.data.errors import DataError

DATASETS = ("lastfm", "movielens", "steam", "synthetic")
DOMAINS = {"lastfm": "artists", "movielens": "movies", "steam": "games"}
SPLIT_FILES = {"train": "train_data.df", "val": "Val_data.df", "test": "Test_data.df"}


def source_files(dataset, source, settings):
    """{role: path} of the raw files `read_source` reads ({} for synthetic)."""
    if dataset == "synthetic":
        return {}
    if not os.path.isdir(source):
        raise DataError(source, "source folder does not exist")
    if dataset in ("lastfm", "steam"):
        files = {"titles": sources.require_file(source, ["id2name.txt"], "title file")}
        for split, name in SPLIT_FILES.items():
            if split == "train" and settings["train_file"]:
                name = settings["train_file"]
            path = sources.find_file(source, [name])
            if path is not None:
                files[split] = path
        if len(files) == 1:
            raise DataError(source, f"source folder has none of {sorted(SPLIT_FILES.values())}")
        return files
    if dataset == "movielens":
        files = {
            "titles": sources.require_file(source, ["u.item"], "MovieLens u.item"),
            "ratings": sources.require_file(source, ["u.data"], "MovieLens u.data")
        }
        if settings["movielens_split"] == "llara":
            for split in ("val", "test"):
                files[split] = sources.require_file(source, [SPLIT_FILES[split]],
                                                    f"LLaRA {split} split")
        return files
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")


def source_identity(files, source):
    """What the prepared data was made from: each file's path in `source`, size and SHA-256."""
    identity = {}
    for role, path in files.items():
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):  # pylint: disable=cell-var-from-loop
                digest.update(chunk)
        identity[role] = dict(file=os.path.relpath(path, source), bytes=os.path.getsize(path),
                              sha256=digest.hexdigest())
    return identity


def read_source(dataset, files, settings):
    """Catalogue and {split: SplitRows} (before the length filter) from `source_files`."""
    if dataset == "synthetic":
        return synthetic.generate(**settings["synthetic"])
    if dataset == "movielens":
        return _read_movielens(files, settings)
    catalogue = catalogue_lib.read_id2name(files["titles"], DOMAINS[dataset])
    splits = {
        split: sources.read_llara_split(files[split], catalogue.num_items,
                                        infer_sequences=split == "train",
                                        catalogue_file=files["titles"])
        for split in SPLIT_FILES if split in files
    }
    return catalogue, splits


def _read_movielens(files, settings):
    catalogue = catalogue_lib.read_movielens_items(files["titles"], settings["movielens_titles"])
    users = sources.read_movielens_ratings(files["ratings"], catalogue.num_items,
                                           settings["movielens_min_rating"])
    items = lambda user: [item for item, _ in users[user]]
    if settings["movielens_split"] == "raw":
        train, val, test = sources.split_users(users, settings["split_seed"])
        return catalogue, {
            "train": sources.rows_from_sequences([items(u) for u in train], catalogue.pad_id),
            "val": sources.rows_from_sequences([items(u) for u in val], catalogue.pad_id, True),
            "test": sources.rows_from_sequences([items(u) for u in test], catalogue.pad_id, True),
        }
    splits, held_out = {}, set()
    for split in ("val", "test"):
        rows = sources.read_llara_split(files[split], catalogue.num_items,
                                        catalogue_file=files["titles"])
        matched = sources.match_rows_to_users(rows, users, files[split])
        splits[split] = dataclasses.replace(rows, interactions=sum(len(users[u]) for u in matched))
        held_out.update(matched)
    train_users = sorted(set(users) - held_out)
    logging.info("movielens: %d users in LLaRA's val/test, train rebuilt from %d users",
                 len(held_out), len(train_users))
    splits["train"] = sources.rows_from_sequences([items(u) for u in train_users], catalogue.pad_id)
    return catalogue, splits


def _check_output_folder(out_dir):
    """Fails before any input is read when `out_dir` cannot become a folder we write into: it is
    a file, lies under one, or its nearest existing folder is read-only. (A folder in an object
    store reports such problems at the first write.)"""
    if run_paths.is_url(out_dir):
        return
    existing = os.path.abspath(out_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise DataError(out_dir, f"cannot be the output folder: {existing} is a file")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise DataError(out_dir, f"cannot write the output folder ({existing}: "
                        f"{e.strerror})") from e


def _columns(split, rows, catalogue, settings):
    """The stored arrays of one split; val/test get their fixed candidate sets."""
    columns = {field: getattr(rows, field) for field in storage.FIELDS if field != "candidates"}
    if split in storage.TRAINING_SPLITS:
        columns["candidates"] = np.full((len(rows), candidates.NUM_CANDIDATES), -1, np.int32)
    else:
        columns["candidates"] = candidates.candidates_for_rows(
            rows.history, rows.history_len, rows.target, rows.row_id, catalogue.num_items,
            (settings["candidate_seed"], candidates.SPLIT_STREAM[split]),
            **candidates.draw_rules(catalogue, settings))
    return columns


def prepare(dataset, source, out_dir, **overrides):
    """Prepares one dataset into `out_dir` and returns its manifest.

    Skips the work when `out_dir` already holds the same dataset prepared with the same
    settings from the same source files (sizes and SHA-256 in the manifest); refuses
    (DataError) to overwrite one prepared with different settings or files.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    unknown = set(overrides) - set(storage.default_settings())
    if unknown:
        raise ValueError(f"unknown prepare settings {sorted(unknown)}")
    settings = storage.with_defaults(overrides)
    if settings["movielens_split"] not in ("llara", "raw"):
        raise ValueError(f"movielens_split must be 'llara' or 'raw', not "
                         f"{settings['movielens_split']!r}")
    existing = storage.read_manifest(out_dir)
    if existing is not None and (existing["dataset"] != dataset
                                 or existing["settings"] != settings):
        raise DataError(
            out_dir, f"already holds {existing['dataset']} prepared with settings "
            f"{existing['settings']}; use another output folder or delete it")
    if existing is None:
        _check_output_folder(out_dir)
    files = source_files(dataset, source, settings)
    identity = source_identity(files, source)
    if existing is not None:
        _check_same_source(out_dir, existing.get("source_files"), identity)
        logging.info(
            "prepare: %s already holds %s prepared with these settings and source "
            "files; skipping", out_dir, dataset)
        return existing
    start = time.time()
    catalogue, splits = read_source(dataset, files, settings)
    logging.info("prepare: read %s (%d items) in %.1fs: %s", dataset, catalogue.num_items,
                 time.time() - start, {s: len(r)
                                       for s, r in splits.items()})
    columns, split_counts = {}, {}
    for split in (s for s in storage.SPLITS if s in splits):
        rows = splits[split]
        # Where the users' full sequences are unknown: train rows cover every prefix, one row
        # per interaction; val/test rows show only the last MAX_HISTORY items plus the target.
        interactions = rows.interactions
        if interactions is None:
            interactions = (len(rows) if split in storage.TRAINING_SPLITS else
                            int(rows.history_len.sum()) + len(rows))
        kept, dropped = sources.drop_short_histories(rows, settings["min_history"])
        split_counts[split] = dict(rows_read=len(rows), dropped_short=dropped, rows=len(kept),
                                   sequences=rows.num_sequences, interactions=interactions)
        columns[split] = _columns(split, kept, catalogue, settings)
        logging.info("prepare: %s %s: %d rows read, %d with < %d history items dropped, %d kept",
                     dataset, split, len(rows), dropped, settings["min_history"], len(kept))
    manifest = dict(dataset=dataset, domain=catalogue.domain, num_items=catalogue.num_items,
                    pad_id=catalogue.pad_id, max_history=sources.MAX_HISTORY,
                    num_candidates=candidates.NUM_CANDIDATES,
                    empty_title_ids=list(catalogue.empty_title_ids),
                    source=os.path.abspath(source) if dataset != "synthetic" else "",
                    source_files=identity, settings=settings, splits=split_counts)
    storage.write_prepared(out_dir, dataset, catalogue, columns, manifest)
    logging.info("prepare: wrote %s in %.1fs", out_dir, time.time() - start)
    return manifest


def _check_same_source(out_dir, recorded, identity):
    """Refuses a prepared folder made from other source files than those found now."""
    if recorded is None:  # Prepared before the manifest recorded its sources.
        logging.warning("prepare: %s does not record its source files; reusing it unchecked",
                        out_dir)
        return
    changed = [
        f"{role} ({recorded.get(role, {}).get('file', 'absent')} → "
        f"{identity.get(role, {}).get('file', 'absent')})"
        for role in sorted(set(recorded) | set(identity))
        if recorded.get(role) != identity.get(role)
    ]
    if changed:
        raise DataError(
            out_dir, f"was prepared from other source files; differing: "
            f"{', '.join(changed)} (sizes or SHA-256); use another output folder "
            "or delete it")


def run_step(config, workdir):
    """The pipeline's `prepare` step (config.data); returns the per-split counts."""
    data = config.data
    if data.name != "synthetic" and not data.source:
        raise ValueError(f"config.data.source is empty: set it to the folder with the raw "
                         f"{data.name} files (--config.data.source=DIR)")
    settings = {key: data[key] for key in storage.default_settings() if key != "synthetic"}
    manifest = prepare(data.name, data.source, run_paths.data_dir(config, workdir),
                       synthetic=data.synthetic.to_dict(), **settings)
    return dict(dataset=manifest["dataset"], num_items=manifest["num_items"],
                splits=manifest["splits"])


def main(argv):
    del argv
    f = flags.FLAGS
    manifest = prepare(f.dataset, f.source, f.out, min_history=f.min_history,
                       candidate_seed=f.candidate_seed, movielens_split=f.movielens_split,
                       movielens_titles=f.movielens_titles, train_file=f.train_file,
                       distinct_candidate_titles=f.distinct_candidate_titles)
    for split, counts in manifest["splits"].items():
        print(f"{split}: {counts['rows']} rows ({counts['rows_read']} read, "
              f"{counts['dropped_short']} dropped as too short)")
    print(f"items: {manifest['num_items']}")


if __name__ == "__main__":
    flags.DEFINE_enum("dataset", None, DATASETS, "Which dataset to prepare.")
    flags.DEFINE_string("source", "", "Folder with the raw files (unused for synthetic).")
    flags.DEFINE_string("out", None, "Output folder for the prepared dataset.")
    flags.DEFINE_integer("min_history", 3, "Drop rows with fewer history items (LLaRA: 3).")
    flags.DEFINE_integer("candidate_seed", 0, "Seed of the fixed val/test candidate sets.")
    flags.DEFINE_enum("movielens_split", "llara", ["llara", "raw"],
                      "MovieLens: LLaRA's val/test + rebuilt train, or all from u.data.")
    flags.DEFINE_enum("movielens_titles", "clean", ["clean", "llara"],
                      "MovieLens title normalisation (catalogue.normalise_movie_title).")
    flags.DEFINE_string("train_file", "", "Train file name to use instead of train_data.df.")
    flags.DEFINE_bool("distinct_candidate_titles", False,
                      "No two candidates share a title (for catalogues with shared titles).")
    flags.mark_flags_as_required(["dataset", "out"])
    from rsllm_jax import cli  # pylint: disable=g-import-not-at-top

    with cli.one_line_errors():
        app.run(main)
