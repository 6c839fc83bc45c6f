"""Results of finished runs as one Markdown table beside the paper's numbers, and a bar chart.

  python -m rsllm_jax.report RUNDIR... [--out report.md] [--plot hit_ratio.png]
      [--label RUNDIR=NAME ...] [--backbones]

A RUNDIR is the `--workdir` of `python -m rsllm_jax.main`. Its row comes from
`metrics/eval.json` (an LLM run: zero-shot, TALLRec, LLaRA, RSLLM or an ablation) or, when
there is none, from `metrics/rec.json` (a conventional recommender alone). The method's name
is derived from the run's config (`--label RUNDIR=NAME` overrides it) and decides which row of
the paper's Table 2 (or Table 4, for the ablations) is printed beside it. `--backbones` adds
the recommender of each LLM run as a row of its own. LLM runs that differ only in the seed
merge into one row (mean ± std); a second table compares such rows paired by seed, and a last
one lists each of their runs.
"""

import argparse
import dataclasses
import json
import os
import re

import numpy as np

from rsllm_jax import run_paths

MISSING = "—"

DATASET_NAMES = {
    "movielens": "MovieLens", "steam": "Steam", "lastfm": "LastFM", "synthetic": "synthetic"
}
REC_NAMES = {"gru4rec": "GRU4Rec", "caser": "Caser", "sasrec": "SASRec"}

# The paper's Table 2 (Liao et al.'s protocol: HitRatio@1 over 20 fixed candidates, mean of
# 5 seeds), transcribed from "Integrating Recommendation Systems as a New Language in Large
# Models" (RSLLM), §5.2, Table 2: method → dataset → (HitRatio@1, ValidRatio).
PAPER_TABLE2 = {
    "GRU4Rec": {
        "MovieLens": (0.3750, 1.0000), "Steam": (0.4768, 1.0000), "LastFM": (0.2616, 1.0000)
    },
    "Caser": {"MovieLens": (0.3861, 1.0000), "Steam": (0.4368, 1.0000), "LastFM": (0.2233, 1.0000)},
    "SASRec": {
        "MovieLens": (0.3444, 1.0000), "Steam": (0.4010, 1.0000), "LastFM": (0.2233, 1.0000)
    },
    "Llama2 zero-shot": {
        "MovieLens": (0.0421, 0.4421), "Steam": (0.0135, 0.1653), "LastFM": (0.0246, 0.3443)
    },
    "GPT-4": {"MovieLens": (0.2000, 0.9895), "Steam": (0.3626, 0.9798), "LastFM": (0.3770, 1.0000)},
    "MoRec": {"MovieLens": (0.2822, 1.0000), "Steam": (0.3911, 1.0000), "LastFM": (0.1652, 1.0000)},
    "TALLRec": {
        "MovieLens": (0.3895, 0.9263), "Steam": (0.4637, 0.9840), "LastFM": (0.4180, 0.9836)
    },
    "LLaRA (GRU4Rec)": {
        "MovieLens": (0.4421, 0.9684), "Steam": (0.4924, 0.9975), "LastFM": (0.4344, 0.9836)
    },
    "LLaRA (Caser)": {
        "MovieLens": (0.4737, 0.9684), "Steam": (0.4874, 0.9966), "LastFM": (0.4344, 0.9918)
    },
    "LLaRA (SASRec)": {
        "MovieLens": (0.4421, 0.9684), "Steam": (0.4949, 0.9975), "LastFM": (0.4508, 1.0000)
    },
    "RSLLM (GRU4Rec)": {
        "MovieLens": (0.4947, 0.9698), "Steam": (0.5130, 0.9980), "LastFM": (0.4649, 0.9919)
    },
    "RSLLM (Caser)": {
        "MovieLens": (0.5273, 0.9701), "Steam": (0.4953, 0.9968), "LastFM": (0.4646, 0.9939)
    },
    "RSLLM (SASRec)": {
        "MovieLens": (0.5005, 0.9700), "Steam": (0.5241, 0.9982), "LastFM": (0.4980, 1.0000)
    },
}

# The same paper's Table 4 (§5.3), the ablations of RSLLM (SASRec), keyed by the labels
# `method_label` gives them: method → dataset → (HitRatio@1, ValidRatio).
PAPER_TABLE4 = {
    "RSLLM (SASRec) w/o text": {
        "MovieLens": (0.4010, 0.9369), "Steam": (0.4201, 0.9501), "LastFM": (0.2230, 0.9135)
    },
    "RSLLM w/o item ID": {
        "MovieLens": (0.4152, 0.9421), "Steam": (0.4794, 0.9735), "LastFM": (0.4317, 0.9811)
    },
    "RSLLM (SASRec) w/o IID tokens": {
        "MovieLens": (0.4316, 0.9669), "Steam": (0.4890, 0.9801), "LastFM": (0.4347, 0.9811)
    },
    # The second readings of two ablations (configs/presets.py) report against the same rows.
    "RSLLM (SASRec) w/o IID tokens (text stage 1)": {
        "MovieLens": (0.4316, 0.9669), "Steam": (0.4890, 0.9801), "LastFM": (0.4347, 0.9811)
    },
    "RSLLM (SASRec) w/o text (both stages)": {
        "MovieLens": (0.4010, 0.9369), "Steam": (0.4201, 0.9501), "LastFM": (0.2230, 0.9135)
    },
    "RSLLM (SASRec) w/o pre-loaded embeddings": {
        "MovieLens": (0.4343, 0.9608), "Steam": (0.4905, 0.9866), "LastFM": (0.4388, 0.9818)
    },
    "RSLLM (SASRec) U-I only": {
        "MovieLens": (0.4754, 0.9686), "Steam": (0.5005, 0.9980), "LastFM": (0.4849, 1.0000)
    },
    "RSLLM (SASRec) I-I only": {
        "MovieLens": (0.4701, 0.9695), "Steam": (0.4989, 0.9978), "LastFM": (0.4831, 1.0000)
    },
    "RSLLM (SASRec) w/o contrastive": {
        "MovieLens": (0.4544, 0.9675), "Steam": (0.4958, 0.9978), "LastFM": (0.4765, 0.9970)
    },
    "RSLLM (SASRec) stage 1 only": {
        "MovieLens": (0.4073, 0.9608), "Steam": (0.4905, 0.9866), "LastFM": (0.4388, 0.9818)
    },
    "RSLLM (SASRec) stage 2 only": {
        "MovieLens": (0.4231, 0.9684), "Steam": (0.5148, 0.9962), "LastFM": (0.4974, 1.0000)
    },
}

COLUMNS = ("dataset", "method", "HitRatio@1", "ValidRatio", "strict HR@1", "strict ValidRatio",
           "ranking HR@1", "NDCG@5", "paper HR@1 (ValidRatio)")
# Shown only when some run measured them (decoding restricted to the candidates is optional).
CONSTRAINED_COLUMNS = ("constrained HR@1", "constrained ValidRatio")

# Columns compared between two LLM rows run over the same seeds (format_paired_table).
PAIRED_COLUMNS = ("HitRatio@1", "constrained HR@1", "ranking HR@1")
# eval.json key of each measured column.
EVAL_KEYS = {
    "HitRatio@1": "hit_ratio_at_1", "ValidRatio": "valid_ratio",
    "strict HR@1": "strict_hit_ratio_at_1", "strict ValidRatio": "strict_valid_ratio",
    "ranking HR@1": "rank_hit_ratio_at_1", "NDCG@5": "rank_ndcg_at_5",
    "constrained HR@1": "constrained_hit_ratio_at_1",
    "constrained ValidRatio": "constrained_valid_ratio"
}
# rec.json (test split) key of each measured column; the recommender ranks the candidates, so
# its HitRatio@1 is also its ranking HR@1. ValidRatio is left out: nothing is generated.
REC_KEYS = {"HitRatio@1": "hit_ratio_at_1", "ranking HR@1": "hit_ratio_at_1", "NDCG@5": "ndcg_at_5"}
# eval.json keys of the whole-catalogue table (runs evaluated with config.eval.retrieve_k > 0).
CATALOGUE_KEYS = {
    "recall@K": "catalogue_recall_at_k", "recommender HR@10": "catalogue_rec_hit_ratio_at_10",
    "recommender NDCG@10": "catalogue_rec_ndcg_at_10",
    "re-ranked HR@10": "catalogue_rerank_hit_ratio_at_10",
    "re-ranked NDCG@10": "catalogue_rerank_ndcg_at_10"
}


@dataclasses.dataclass
class Row:
    """One line of the table: where it came from, what it is, what it measured."""

    run_dir: str
    dataset: str  # Display name, e.g. "LastFM"; "LastFM (val)" when not the test split.
    method: str
    values: dict  # Column name → (mean, std or None); missing columns are absent.
    paper: tuple | None  # (HitRatio@1, ValidRatio) from the paper, when it reports the row.
    # LLM runs whose configs differ only in the seed share this key and merge into one row.
    seed_group: str | None = None
    num_runs: int = 1
    retrieve_k: int | None = None  # K of the whole-catalogue columns, when measured.
    seed: int | None = None  # config.seed of an LLM run.
    runs: tuple = ()  # The one-seed rows a row over several seeds was merged from.


# --- reading a run directory -----------------------------------------------------------------


def _read_json(path):
    try:
        return json.loads(run_paths.as_path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _read_metrics(run_dir, step):
    """The `metrics` of `<run_dir>/metrics/<step>.json` and its config sections, or None."""
    path = run_paths.metrics_path(run_dir, step)
    if not path.exists():
        return None, {}
    record = _read_json(path)
    if not isinstance(record, dict) or not isinstance(record.get("metrics"), dict):
        raise ValueError(f"{path}: no 'metrics' object; not written by rsllm_jax.main?")
    return record["metrics"], record.get("config") or {}


def _read_config(run_dir, sections):
    """config.json, or (a run dir copied without it) the sections the metrics files record."""
    path = run_paths.as_path(run_dir) / "config.json"
    if path.exists():
        return _read_json(path)
    if not sections:
        raise ValueError(f"{run_dir}: no config.json and its metrics files record no config")
    return sections


def _get(config, dotted, default=None):
    """config['a']['b'] for 'a.b', or `default` where any level is missing."""
    node = config
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


# --- naming the method -----------------------------------------------------------------------


def rec_label(rec_metrics, config):
    """'SASRec', 'SASRec (ce)', 'SASRec (bce_dros)' or 'SASRec (LLaRA checkpoint)' for a
    recommender's results: the paper's `bce` recipe carries no suffix."""
    model = rec_metrics.get("model") or _get(config, "rec.model", "")
    name = REC_NAMES.get(model, model or "recommender")
    loss = rec_metrics.get("loss")
    if loss == "imported":
        return f"{name} (LLaRA checkpoint)"
    if loss and loss != "bce":
        return f"{name} ({loss})"
    return name


def _model_display_name(model_name):
    """'/models/Llama-2-7b-hf/' → 'Llama-2-7b-hf', 'x/smollm.gguf' → 'smollm'; 'tiny' stays;
    the base a `pretrain` step wrote ('.../pretrain/hf') → 'pre-trained base'."""
    path = str(model_name).rstrip("/\\")
    if path.replace("\\", "/").endswith("pretrain/hf"):
        return "pre-trained base"
    base = os.path.basename(path) or str(model_name)
    return base.removesuffix(".gguf")


def _stage_formats(eval_metrics, config):
    """The item formats the evaluated model was trained on, in order (empty for 'base')."""
    stage = eval_metrics.get("stage")
    last = eval_metrics.get("item_format")
    if stage == "stage1":
        return (last or _get(config, "stage1.item_format"), )
    if stage == "stage2":
        last = last or _get(config, "stage2.item_format")
        if _get(config, "stage2.init_from_stage1", True):
            return (_get(config, "stage1.item_format"), last)
        return (last, )
    return ()


def _trained_stages(eval_metrics, config):
    """The stages `_stage_formats` lists, by name."""
    stage = eval_metrics.get("stage")
    if stage == "stage2" and _get(config, "stage2.init_from_stage1", True):
        return ("stage1", "stage2")
    return (stage, ) if stage in ("stage1", "stage2") else ()


def method_label(config, eval_metrics=None, rec_metrics=None):
    """The name of the method a run represents, from its config and metrics.

    With eval metrics: '<model> zero-shot' for the untrained model; 'RSLLM (<rec>)' for the
    paper's text_id → hybrid curriculum with both contrastive losses (γ, β > 0), with the
    ablation's name appended when a part is missing ('U-I only' for γ = 0, 'I-I only' for
    β = 0, 'w/o contrastive', 'w/o IID tokens', 'w/o pre-loaded embeddings', 'stage 1 only',
    'stage 2 only', 'w/o text' for behavioural-token-only prompts, and any curriculum named);
    'TALLRec' for text prompts with the next-item loss alone ('RSLLM w/o item ID' with the
    contrastive losses); 'LLaRA (<rec>)' for llara prompts (its curriculum from text is part
    of the method). Anything else gets a description of its formats and loss weights. Without
    eval metrics, the recommender's name (`rec_label`).
    """
    if eval_metrics is None:
        if rec_metrics is None:
            raise ValueError("method_label needs eval or rec metrics")
        return rec_label(rec_metrics, config)
    rec = REC_NAMES.get(_get(config, "rec.model", ""), _get(config, "rec.model", "") or "?")
    if eval_metrics.get("stage") == "base":
        name = f"{_model_display_name(_get(config, 'model.name', 'LLM'))} zero-shot"
        item_format = eval_metrics.get("item_format")
        # The paper's zero-shot rows read plain text prompts; say when these did not.
        return name if item_format in (None, "text") else f"{name} ({item_format} prompts)"

    formats = _stage_formats(eval_metrics, config)
    gamma = float(_get(config, "train.gamma", 0.0) or 0.0)
    beta = float(_get(config, "train.beta", 0.0) or 0.0)
    iid_tokens = bool(_get(config, "prompts.iid_tokens", True))
    if "llara" in formats and gamma == 0 and beta == 0:
        return f"LLaRA ({rec})"
    if formats and all(f == "text" for f in formats):
        # Titles alone: the recommender plays no part, so no backbone in the name.
        return "TALLRec" if gamma == 0 and beta == 0 else "RSLLM w/o item ID"

    ablations = []
    if formats == ("text_id", "hybrid"):
        pass
    elif formats == ("text_id", ):
        ablations.append("stage 1 only")
    elif formats == ("hybrid", ):
        ablations.append("stage 2 only")
    elif formats[-1:] == ("behavior", ) and formats[:-1] in ((), ("text_id", ), ("id", )):
        ablations.append("w/o text")
    elif formats == ("iid", "behavior"):
        ablations.append("w/o text (both stages)")
    elif formats == ("text", "hybrid"):
        ablations.append("w/o IID tokens (text stage 1)")
    else:
        return (f"LLM {'→'.join(str(f) for f in formats) or '?'} ({rec}), "
                f"γ={gamma:g}, β={beta:g}")
    if not iid_tokens and {"text_id", "iid"} & set(formats):
        ablations.append("w/o IID tokens")
    if not _get(config, "prompts.preload_iid_embeddings", True) and \
            {"text_id", "iid"} & set(formats):
        ablations.append("w/o pre-loaded embeddings")
    for stage in _trained_stages(eval_metrics, config):
        if _get(config, f"{stage}.curriculum_from"):  # Not part of RSLLM: say it was used.
            ablations.append(f"{stage} curriculum from {_get(config, f'{stage}.curriculum_from')}")
    if gamma == 0 and beta == 0:
        ablations.append("w/o contrastive")
    elif gamma == 0:
        ablations.append("U-I only")  # L_I (weight γ) off: only the user-item alignment.
    elif beta == 0:
        ablations.append("I-I only")  # L_U (weight β) off: only the item-item alignment.
    return " ".join([f"RSLLM ({rec})"] + ([", ".join(ablations)] if ablations else []))


def paper_result(method, dataset):
    """(HitRatio@1, ValidRatio) the paper reports for `method` on `dataset`, or None.

    A LLaRA checkpoint was trained as the paper's recommenders were (LLaRA's code, BCE), so it
    takes that row; one trained with full softmax (ce) is not the paper's setup and gets none.
    Any Llama 2 zero-shot run is compared with the paper's Llama2 row.
    """
    key = method.removesuffix(" (LLaRA checkpoint)")
    if key.endswith(" zero-shot") and re.search(r"llama[-_ ]?2", key, re.IGNORECASE):
        key = "Llama2 zero-shot"
    table = PAPER_TABLE2.get(key) or PAPER_TABLE4.get(key) or {}
    return table.get(dataset)


# --- rows ------------------------------------------------------------------------------------


def _dataset_name(config, split=None):
    name = _get(config, "data.name", "")
    display = DATASET_NAMES.get(name, name or "?")
    return display if split in (None, "test") else f"{display} ({split})"


def _measured(metrics, keys, with_std):
    values = {}
    for column, key in keys.items():
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            std = metrics.get(f"{key}_std") if with_std else None
            values[column] = (float(value), float(std) if isinstance(std, (int, float)) else None)
    return values


def _rec_row(run_dir, config, rec_metrics, label=None):
    test = rec_metrics.get("test") or {}
    # A std over one seed (0 by construction) says nothing; show it for several only.
    with_std = len(rec_metrics.get("seeds") or []) > 1
    method = label or rec_label(rec_metrics, config)
    dataset = _dataset_name(config)
    return Row(run_dir, dataset, method, _measured(test, REC_KEYS, with_std),
               paper_result(method, dataset))


def run_rows(run_dir, label=None, backbones=False):
    """The table rows of one run directory: its method, first its backbone if `backbones`."""
    if not run_paths.as_path(run_dir).is_dir():
        raise ValueError(f"{run_dir}: not a directory")
    eval_metrics, eval_sections = _read_metrics(run_dir, "eval")
    rec_metrics, rec_sections = _read_metrics(run_dir, "rec")
    if eval_metrics is None and rec_metrics is None:
        raise ValueError(f"{run_dir}: no metrics/eval.json or metrics/rec.json; not a finished "
                         "run directory (the --workdir of rsllm_jax.main)?")
    config = _read_config(run_dir, {**rec_sections, **eval_sections})
    if eval_metrics is None:
        return [_rec_row(run_dir, config, rec_metrics, label)]
    rows = []
    if backbones and rec_metrics is not None:
        rows.append(_rec_row(run_dir, config, rec_metrics))
    method = label or method_label(config, eval_metrics, rec_metrics)
    dataset = _dataset_name(config, eval_metrics.get("split"))
    same_but_seed = {k: v for k, v in config.items() if k not in ("seed", "workdir")}
    rows.append(
        Row(run_dir, dataset, method, _measured(eval_metrics,
                                                {**EVAL_KEYS, **CATALOGUE_KEYS}, False),
            paper_result(method, dataset), seed_group=json.dumps([dataset, method, same_but_seed],
                                                                 sort_keys=True, default=str),
            retrieve_k=eval_metrics.get("retrieve_k"), seed=config.get("seed")))
    return rows


def merge_seeds(rows):
    """One row per LLM method run over several seeds: the mean ± sample std of each column
    over the runs whose configs differ only in `seed` (the recommenders' rows already are)."""
    merged, groups = [], {}
    for row in rows:
        if row.seed_group is None:
            merged.append(row)
        elif row.seed_group in groups:
            groups[row.seed_group].append(row)
        else:
            groups[row.seed_group] = [row]
            merged.append(row)
    out = []
    for row in merged:
        runs = groups.get(row.seed_group) if row.seed_group is not None else None
        if not runs or len(runs) == 1:
            out.append(row)
            continue
        values = {}
        for column in row.values:
            measured = [r.values[column][0] for r in runs if column in r.values]
            if len(measured) == len(runs):
                values[column] = (float(np.mean(measured)), float(np.std(measured, ddof=1)))
        out.append(dataclasses.replace(row, values=values, num_runs=len(runs), runs=tuple(runs)))
    return out


def _norm(path):
    return os.fspath(path) if run_paths.is_url(path) else os.path.normpath(os.path.abspath(path))


def collect_rows(run_dirs, labels=None, backbones=False):
    """Rows of every run directory, in order; `labels` maps a run directory to its name."""
    labels = {_norm(k): v for k, v in (labels or {}).items()}
    unknown = set(labels) - {_norm(d) for d in run_dirs}
    if unknown:
        raise ValueError(f"--label names directories not in the report: {sorted(unknown)}")
    rows = []
    for run_dir in run_dirs:
        rows.extend(run_rows(run_dir, labels.get(_norm(run_dir)), backbones))
    return merge_seeds(rows)


# --- the table -------------------------------------------------------------------------------


def _format_value(value):
    if value is None:
        return MISSING
    mean, std = value
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def _cell(text):
    return str(text).replace("|", "\\|")  # A pipe inside a label would split the cell.


def _markdown_line(cells):
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


# Columns that hold text (left-aligned); every other column holds a number (right-aligned).
TEXT_COLUMNS = ("dataset", "method", "difference", "run")


def _markdown_header(columns):
    """The header line and the alignment line."""
    return [
        _markdown_line(columns),
        "|" + "|".join("---" if c in TEXT_COLUMNS else "---:" for c in columns) + "|"
    ]


def format_table(rows):
    """The Markdown table of `rows`, and a line naming the paper's tables."""
    columns = list(COLUMNS)
    if any(c in row.values for row in rows for c in CONSTRAINED_COLUMNS):
        columns[-1:-1] = CONSTRAINED_COLUMNS
    lines = _markdown_header(columns)
    for row in rows:
        method = row.method if row.num_runs == 1 else f"{row.method} ({row.num_runs} seeds)"
        cells = [row.dataset, method]
        cells += [_format_value(row.values.get(c)) for c in columns[2:-1]]
        cells.append(MISSING if row.paper is None else f"{row.paper[0]:.4f} ({row.paper[1]:.4f})")
        lines.append(_markdown_line(cells))
    lines.append("")
    lines.append("HitRatio@1 and ValidRatio: the paper's rule (valid when exactly one "
                 "candidate title occurs in the answer's first line, a hit when it is the "
                 "target); strict: exact-title matching; ranking: the candidates "
                 "ranked by score. Mean ± std over seeds where several ran. Paper: "
                 "RSLLM Table 2, ablations Table 4.")
    return ("\n".join(lines) + "\n" + format_catalogue_table(rows) + format_paired_table(rows) +
            format_seed_table(rows, columns[2:-1]))


def format_catalogue_table(rows):
    """The whole-catalogue Markdown table of the rows that measured it ("" when none did)."""
    measured = [row for row in rows if any(c in row.values for c in CATALOGUE_KEYS)]
    if not measured:
        return ""
    columns = ["dataset", "method", "K", *CATALOGUE_KEYS]
    lines = [""] + _markdown_header(columns)
    for row in measured:
        method = row.method if row.num_runs == 1 else f"{row.method} ({row.num_runs} seeds)"
        cells = [row.dataset, method, MISSING if row.retrieve_k is None else row.retrieve_k]
        cells += [_format_value(row.values.get(c)) for c in CATALOGUE_KEYS]
        lines.append(_markdown_line(cells))
    lines += [
        "", "Whole catalogue: the recommender scores every item outside the history "
        "(recommender HR@10, NDCG@10) and the LLM re-ranks its top K by the "
        "likelihood of each title (re-ranked); recall@K: the true item is among "
        "the K."
    ]
    return "\n".join(lines) + "\n"


def _runs_by_seed(row):
    """{seed: the row of that seed's run} of an LLM row (one run or several merged)."""
    return {run.seed: run for run in (row.runs or (row, )) if run.seed is not None}


def paired_difference(later, earlier, column):
    """(mean, standard error, seeds) of `later` − `earlier` in `column`, pairing the two rows'
    runs of each seed both ran (the seed fixes the LoRA's initialisation and the data order, so
    paired differences vary less than the rows do); None under two seeds."""
    a, b = _runs_by_seed(later), _runs_by_seed(earlier)
    differences = [
        a[seed].values[column][0] - b[seed].values[column][0] for seed in sorted(set(a) & set(b))
        if column in a[seed].values and column in b[seed].values
    ]
    if len(differences) < 2:
        return None
    return (float(np.mean(differences)),
            float(np.std(differences, ddof=1) / np.sqrt(len(differences))), len(differences))


def _format_difference(difference):
    if difference is None:
        return MISSING
    mean, error, _ = difference
    text = f"{mean:+.4f} ± {error:.4f}"
    return f"{text} ({mean / error:+.1f} SE)" if error > 0 else text


def format_paired_table(rows):
    """The Markdown table of every two LLM rows of a dataset that ran two or more seeds in
    common: the later row minus the earlier, paired by seed, with its standard error ("" when
    no two rows qualify). Table 2's claims (RSLLM > LLaRA > TALLRec) are differences of this
    kind, and one is measured when it lies several standard errors from zero."""
    llm_rows = [row for row in rows if row.seed_group is not None]
    lines = []
    for j, later in enumerate(llm_rows):
        for earlier in llm_rows[:j]:
            if later.dataset != earlier.dataset:
                continue
            differences = [paired_difference(later, earlier, c) for c in PAIRED_COLUMNS]
            if not any(differences):
                continue
            seeds = max(d[2] for d in differences if d)
            cells = [later.dataset, f"{later.method} − {earlier.method}", seeds]
            cells += [_format_difference(d) for d in differences]
            lines.append(_markdown_line(cells))
    if not lines:
        return ""
    columns = ["dataset", "difference", "seeds", *PAIRED_COLUMNS]
    header = [""] + _markdown_header(columns)
    footer = [
        "", "Paired by seed: the later row minus the earlier, the mean over the seeds both "
        "ran ± its standard error (the std of the per-seed differences / √seeds) and, in "
        "brackets, how many standard errors the mean is from zero."
    ]
    return "\n".join(header + lines + footer) + "\n"


def format_seed_table(rows, columns):
    """The Markdown table of each run of the rows merged over several seeds, one line per seed
    ("" when no row was): the figures behind a mean ± std, which a later comparison paired by
    seed needs once the run folders are gone."""
    merged = [row for row in rows if row.num_runs > 1]
    if not merged:
        return ""
    header = _markdown_header(["dataset", "method", "seed", *columns, "run"])
    lines = []
    for row in merged:
        for run in sorted(row.runs, key=lambda run: (run.seed is None, run.seed or 0)):
            cells = [row.dataset, row.method, MISSING if run.seed is None else run.seed]
            cells += [_format_value(run.values.get(c)) for c in columns]
            lines.append(_markdown_line(cells + [run.run_dir]))
    lines += ["", "Per seed: the runs behind each row that several seeds ran."]
    return "\n".join([""] + header + lines) + "\n"


def results_table(run_dirs, labels=None, backbones=False):
    """The Markdown results table of `run_dirs` (one path or a list), as the CLI prints it."""
    if isinstance(run_dirs, (str, os.PathLike)):
        run_dirs = [run_dirs]
    return format_table(collect_rows([os.fspath(d) for d in run_dirs], labels, backbones))


# --- the chart -------------------------------------------------------------------------------


def plot_hit_ratio(rows, path):
    """A bar chart of each row's HitRatio@1 (with its std), the paper's value beside it."""
    import matplotlib  # Imported here: the table alone must not need a plotting stack.
    matplotlib.use("Agg")  # No display on servers and in tests.
    from matplotlib import pyplot as plt

    width = 0.38
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows) + 2), 4.5))
    try:
        xs = list(range(len(rows)))
        ours = [row.values.get("HitRatio@1") for row in rows]
        heights = [v[0] if v else 0.0 for v in ours]
        errors = [v[1] if v and v[1] is not None else 0.0 for v in ours]
        ax.bar([x - width / 2 for x in xs], heights, width, color="tab:blue", label="this run")
        spread = [(x - width / 2, h, e) for x, h, e in zip(xs, heights, errors) if e > 0]
        if spread:  # Only rows over several seeds; a zero bar would still draw its caps.
            ax.errorbar([x for x, _, _ in spread], [h for _, h, _ in spread],
                        yerr=[e for _, _, e in spread], fmt="none", ecolor="black", capsize=3)
        for x, v in zip(xs, ours):
            if v is None:  # Say the value is missing rather than draw a misleading zero.
                ax.text(x - width / 2, 0.01, "n/a", ha="center", va="bottom", fontsize=8)
        known = [(x, row.paper[0]) for x, row in zip(xs, rows) if row.paper is not None]
        if known:
            ax.bar([x + width / 2 for x, _ in known], [h for _, h in known], width,
                   color="lightgrey", edgecolor="grey", hatch="//", label="paper")
        top = max([h + e for h, e in zip(heights, errors)] + [h for _, h in known] + [0.0])
        ax.set_ylim(0, min(1.0, top * 1.15) if top > 0 else 1.0)
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{row.method}\n{row.dataset}" for row in rows],
                           rotation=30 if len(rows) > 4 else 0,
                           ha="right" if len(rows) > 4 else "center", fontsize=8)
        ax.set_ylabel("HitRatio@1")
        ax.set_title("HitRatio@1 over 20 candidates")
        ax.legend()
        fig.tight_layout()
        with run_paths.as_path(path).open("wb") as f:  # A local file or an object.
            fig.savefig(f, format="png", dpi=120)
    finally:
        plt.close(fig)


# --- command line ----------------------------------------------------------------------------


def _parse_labels(parser, items):
    labels = {}
    for item in items:
        run_dir, sep, name = item.partition("=")  # A name may hold '=' ("γ=0"), paths rarely.
        if not sep or not run_dir or not name:
            parser.error(f"--label {item!r}: expected RUNDIR=NAME")
        labels[run_dir] = name
    return labels


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUNDIR",
                        help="run directory (the --workdir of rsllm_jax.main)")
    parser.add_argument("--out", help="also write the Markdown table to this file")
    parser.add_argument("--plot", help="write a PNG bar chart of HitRatio@1 to this file")
    parser.add_argument("--label", action="append", default=[], metavar="RUNDIR=NAME",
                        help="name a run's method instead of deriving it (repeatable)")
    parser.add_argument("--backbones", action="store_true",
                        help="add the recommender of each LLM run as a row of its own")
    args = parser.parse_args(argv)

    try:
        rows = collect_rows(args.run_dirs, _parse_labels(parser, args.label), args.backbones)
    except ValueError as e:
        parser.error(str(e))
    table = format_table(rows)
    print(table, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    if args.plot:
        plot_hit_ratio(rows, args.plot)


if __name__ == "__main__":
    from rsllm_jax import cli  # pylint: disable=g-import-not-at-top

    with cli.one_line_errors():
        main()
