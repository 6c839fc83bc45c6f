"""The results report: method names from run configs, the Markdown table, the paper column, the
chart and the command line, on run directories written the way rsllm_jax.main writes them."""

import json
import struct

import pytest

from rsllm_jax import report


def _config(dataset="lastfm", rec_model="sasrec", stage1="text_id", stage2="hybrid", gamma=0.3,
            beta=0.4, init_from_stage1=True, iid_tokens=True, model_name="tiny", preload=True,
            curriculum="", curriculum_stage="stage2"):
    """The config.json sections the report reads, with the paper's RSLLM as the default."""
    config = {
        "jobs": "prepare,rec,stage1,stage2,eval",
        "data": {"name": dataset},
        "rec": {"model": rec_model, "loss": "bce"},
        "model": {"name": model_name},
        "prompts": {"iid_tokens": iid_tokens, "preload_iid_embeddings": preload},
        "train": {"gamma": gamma, "beta": beta},
        "stage1": {"item_format": stage1, "curriculum_from": ""},
        "stage2": {
            "item_format": stage2, "init_from_stage1": init_from_stage1, "curriculum_from": ""
        },
        "eval": {"split": "test", "stage": "auto"},
    }
    config[curriculum_stage]["curriculum_from"] = curriculum
    return config


def _write_run(run_dir, config, rec=None, evaluation=None, write_config=True):
    """A run directory as rsllm_jax.main leaves it: config.json and metrics/<step>.json."""
    (run_dir / "metrics").mkdir(parents=True)
    if write_config:
        (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    for step, metrics, sections in (("rec", rec, ("data", "rec")), ("eval", evaluation,
                                                                    tuple(config))):
        if metrics is not None:
            record = dict(step=step, seconds=1.0,
                          config={s: config[s]
                                  for s in sections if s in config}, metrics=metrics)
            (run_dir / "metrics" / f"{step}.json").write_text(json.dumps(record))
    return str(run_dir)


def _rec_metrics(model="sasrec", loss="bce", seeds=(0, 1, 2), hr1=0.25, hr1_std=0.0123):
    test = dict(hit_ratio_at_1=hr1, hit_ratio_at_1_std=hr1_std, hit_ratio_at_5=0.6,
                hit_ratio_at_5_std=0.01, ndcg_at_5=0.41234, ndcg_at_5_std=0.0045, ndcg_at_10=0.45,
                ndcg_at_10_std=0.004, full_hit_ratio_at_10=0.05, full_hit_ratio_at_10_std=0.001,
                full_ndcg_at_10=0.02, full_ndcg_at_10_std=0.0, num_rows=122)
    return dict(model=model, loss=loss, seeds=list(seeds), val=dict(test), test=test)


def _eval_metrics(stage="stage2", item_format="hybrid", **overrides):
    metrics = dict(split="test", n=122, stage=stage, item_format=item_format, valid_ratio=0.99180,
                   hit_ratio_at_1=0.51234, strict_valid_ratio=0.9, strict_hit_ratio_at_1=0.47,
                   rank_hit_ratio_at_1=0.5, rank_hit_ratio_at_3=0.7, rank_hit_ratio_at_5=0.8,
                   rank_hit_ratio_at_10=0.9, rank_ndcg_at_5=0.66667, rank_ndcg_at_10=0.7)
    metrics.update(overrides)
    return {k: v for k, v in metrics.items() if v is not None}


def _cells(table, method):
    """The cells of the table line whose method column is `method`."""
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 1 and cells[1] == method:
            return cells
    raise AssertionError(f"no row {method!r} in:\n{table}")


@pytest.fixture
def runs(tmp_path):
    """RSLLM on LastFM (with its SASRec), GRU4Rec alone on MovieLens, TALLRec on Steam with
    an eval file missing most measures."""
    rsllm = _write_run(tmp_path / "rsllm", _config(), rec=_rec_metrics(),
                       evaluation=_eval_metrics())
    gru = _write_run(tmp_path / "gru", _config(dataset="movielens", rec_model="gru4rec"),
                     rec=_rec_metrics(model="gru4rec", hr1=0.37, hr1_std=0.02))
    tallrec = _write_run(
        tmp_path / "tallrec",
        _config(dataset="steam", stage1="text", stage2="text", gamma=0.0, beta=0.0),
        evaluation=_eval_metrics(item_format="text", hit_ratio_at_1=0.4, valid_ratio=None,
                                 strict_valid_ratio=None, strict_hit_ratio_at_1=None,
                                 rank_hit_ratio_at_1=None, rank_ndcg_at_5=None))
    return rsllm, gru, tallrec


def test_table_rows_labels_numbers_and_paper_column(runs):
    table = report.results_table(list(runs))
    lines = table.splitlines()
    assert lines[0] == "| " + " | ".join(report.COLUMNS) + " |"
    assert _cells(table, "RSLLM (SASRec)") == [
        "LastFM", "RSLLM (SASRec)", "0.5123", "0.9918", "0.4700", "0.9000", "0.5000", "0.6667",
        "0.4980 (1.0000)"
    ]
    # A recommender alone: test split, mean ± std over its 3 seeds, no ValidRatio measured.
    assert _cells(table, "GRU4Rec") == [
        "MovieLens", "GRU4Rec", "0.3700 ± 0.0200", "—", "—", "—", "0.3700 ± 0.0200",
        "0.4123 ± 0.0045", "0.3750 (1.0000)"
    ]
    assert _cells(table, "TALLRec") == [
        "Steam", "TALLRec", "0.4000", "—", "—", "—", "—", "—", "0.4637 (0.9840)"
    ]
    # Rows in the order of the run directories; no constrained columns when none measured them.
    methods = [line.split("|")[2].strip() for line in lines[2:5]]
    assert methods == ["RSLLM (SASRec)", "GRU4Rec", "TALLRec"]
    assert "constrained" not in table


def test_backbone_rows_and_one_seed_has_no_std(tmp_path):
    run = _write_run(tmp_path / "run", _config(rec_model="caser"),
                     rec=_rec_metrics(model="caser", seeds=(0, ), hr1=0.2,
                                      hr1_std=0.0), evaluation=_eval_metrics())
    assert [row.method for row in report.collect_rows([run])] == ["RSLLM (Caser)"]
    table = report.results_table(run, backbones=True)
    # A std over one seed is 0 by construction and is not shown.
    assert _cells(table, "Caser")[2] == "0.2000"
    assert _cells(table, "Caser")[-1] == "0.2233 (1.0000)"
    assert _cells(table, "RSLLM (Caser)")[-1] == "0.4646 (0.9939)"


@pytest.mark.parametrize(
    "config_kwargs, evaluation, expected",
    [
        (dict(), dict(), "RSLLM (SASRec)"),
        (dict(rec_model="gru4rec"), dict(), "RSLLM (GRU4Rec)"),
        (dict(gamma=0.0), dict(), "RSLLM (SASRec) U-I only"),
        (dict(beta=0.0), dict(), "RSLLM (SASRec) I-I only"),
        (dict(gamma=0.0, beta=0.0), dict(), "RSLLM (SASRec) w/o contrastive"),
        (dict(iid_tokens=False), dict(), "RSLLM (SASRec) w/o IID tokens"),
        (dict(iid_tokens=False, beta=0.0), dict(), "RSLLM (SASRec) w/o IID tokens, I-I only"),
        (dict(preload=False), dict(), "RSLLM (SASRec) w/o pre-loaded embeddings"),
        (dict(curriculum="text"), dict(), "RSLLM (SASRec) stage2 curriculum from text"),
        (dict(), dict(stage="stage1", item_format="text_id"), "RSLLM (SASRec) stage 1 only"),
        (dict(init_from_stage1=False), dict(), "RSLLM (SASRec) stage 2 only"),
        (dict(stage2="behavior"), dict(item_format="behavior"), "RSLLM (SASRec) w/o text"),
        (dict(stage1="iid", stage2="behavior"), dict(item_format="behavior"),
         "RSLLM (SASRec) w/o text (both stages)"),
        (dict(stage1="text", stage2="hybrid"), dict(item_format="hybrid"),
         "RSLLM (SASRec) w/o IID tokens (text stage 1)"),
        (dict(stage1="text", stage2="text"), dict(item_format="text"), "RSLLM w/o item ID"),
        (dict(stage1="text", stage2="text", gamma=0.0,
              beta=0.0), dict(item_format="text"), "TALLRec"),
        (dict(stage1="text", stage2="llara", gamma=0.0,
              beta=0.0), dict(item_format="llara"), "LLaRA (SASRec)"),
        # LLaRA as the presets run it: one stage, its curriculum from text prompts.
        (dict(stage1="llara", gamma=0.0, beta=0.0, curriculum="text", curriculum_stage="stage1"),
         dict(stage="stage1", item_format="llara"), "LLaRA (SASRec)"),
        (dict(rec_model="caser", stage1="text", stage2="llara", gamma=0.0,
              beta=0.0), dict(item_format="llara"), "LLaRA (Caser)"),
        (dict(stage1="text_id", stage2="id",
              beta=0.0), dict(item_format="id"), "LLM text_id→id (SASRec), γ=0.3, β=0"),
        (dict(model_name="/models/Llama-2-7b-hf/"), dict(
            stage="base", item_format="text"), "Llama-2-7b-hf zero-shot"),
        (dict(model_name="ckpt/smollm2.gguf"), dict(
            stage="base", item_format="hybrid"), "smollm2 zero-shot (hybrid prompts)"),
    ])
def test_method_label(config_kwargs, evaluation, expected):
    assert report.method_label(_config(**config_kwargs), _eval_metrics(**evaluation)) == expected


@pytest.mark.parametrize(
    "loss, expected, paper",
    [
        ("bce", "SASRec", (0.2233, 1.0)),
        ("ce", "SASRec (ce)", None),  # Full softmax is not the paper's recommender training.
        ("bce_dros", "SASRec (bce_dros)", None),
        ("imported", "SASRec (LLaRA checkpoint)", (0.2233, 1.0)),
    ])
def test_recommender_labels_and_paper_lookup(loss, expected, paper):
    label = report.method_label(_config(), rec_metrics=_rec_metrics(loss=loss))
    assert label == expected
    assert report.paper_result(label, "LastFM") == paper


def test_paper_lookup_zero_shot_ablation_and_unknown():
    assert report.paper_result("Llama-2-7b-hf zero-shot", "MovieLens") == (0.0421, 0.4421)
    assert report.paper_result("tiny zero-shot", "MovieLens") is None
    assert report.paper_result("RSLLM (SASRec) w/o contrastive", "Steam") == (0.4958, 0.9978)
    assert report.paper_result("RSLLM (SASRec)", "synthetic") is None
    assert report.paper_result("RSLLM (SASRec)", "LastFM (val)") is None


# The paper's "Ave." column of Table 2: (ValidRatio, HitRatio@1) averaged over the 3 datasets.
# Checking the transcribed per-dataset numbers against it catches a mistyped digit.
PAPER_AVERAGES = {
    "GRU4Rec": (1.0, 0.3511),
    "Caser": (1.0, 0.3487),
    "SASRec": (1.0, 0.3229),
    "Llama2 zero-shot": (0.3172, 0.0267),
    "GPT-4": (0.9897, 0.3132),
    "MoRec": (1.0, 0.2795),
    "TALLRec": (0.9646, 0.4237),
    "LLaRA (GRU4Rec)": (0.9831, 0.4563),
    "LLaRA (Caser)": (0.9856, 0.4651),
    "LLaRA (SASRec)": (0.9886, 0.4626),
    "RSLLM (GRU4Rec)": (0.9865, 0.4908),
    "RSLLM (Caser)": (0.9869, 0.4957),
    "RSLLM (SASRec)": (0.9894, 0.5075),
}


def test_paper_table2_matches_its_average_column():
    assert set(report.PAPER_TABLE2) == set(PAPER_AVERAGES)
    for method, (valid_avg, hit_avg) in PAPER_AVERAGES.items():
        results = report.PAPER_TABLE2[method]
        assert set(results) == {"MovieLens", "Steam", "LastFM"}
        hit = sum(r[0] for r in results.values()) / 3
        valid = sum(r[1] for r in results.values()) / 3
        assert valid == pytest.approx(valid_avg, abs=2e-4), method
        if method == "GRU4Rec":
            # The paper prints 0.3511, but its three numbers average 0.3711: a misprint in
            # the Ave. column (the other rows agree to the 4th digit).
            assert hit == pytest.approx(0.3711, abs=1e-4)
        else:
            assert hit == pytest.approx(hit_avg, abs=2e-4), method


def test_label_override_and_constrained_columns(runs, tmp_path):
    rsllm, gru, _ = runs
    constrained = _write_run(
        tmp_path / "constrained", _config(),
        evaluation=_eval_metrics(constrained_valid_ratio=1.0, constrained_hit_ratio_at_1=0.55))
    table = report.results_table([rsllm, gru, constrained],
                                 labels={gru: "My GRU", constrained: "LLaRA (SASRec)"})
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert header[-3:] == ["constrained HR@1", "constrained ValidRatio", "paper HR@1 (ValidRatio)"]
    assert _cells(table, "My GRU")[-1] == "—"  # A name the paper does not use.
    # The given name decides the paper row too.
    assert _cells(table, "LLaRA (SASRec)")[-3:] == ["0.5500", "1.0000", "0.4508 (1.0000)"]
    assert _cells(table, "RSLLM (SASRec)")[-3:] == ["—", "—", "0.4980 (1.0000)"]


def test_config_from_metrics_sections_when_config_json_is_missing(tmp_path):
    run = _write_run(tmp_path / "copied", _config(dataset="movielens", gamma=0.0),
                     rec=_rec_metrics(), evaluation=_eval_metrics(), write_config=False)
    [row] = report.collect_rows([run])
    assert (row.dataset, row.method) == ("MovieLens", "RSLLM (SASRec) U-I only")
    assert row.paper == (0.4754, 0.9686)


def test_val_split_is_marked_and_not_compared(tmp_path):
    run = _write_run(tmp_path / "val", _config(), evaluation=_eval_metrics(split="val"))
    [row] = report.collect_rows([run])
    assert row.dataset == "LastFM (val)" and row.paper is None


def test_directory_without_metrics_is_named_in_the_error(tmp_path, runs):
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"not_a_run: no metrics/eval.json or metrics/rec.json"):
        report.results_table([runs[0], str(empty)])
    with pytest.raises(ValueError, match="missing_dir: not a directory"):
        report.results_table(str(tmp_path / "missing_dir"))
    broken = tmp_path / "broken"
    (broken / "metrics").mkdir(parents=True)
    (broken / "metrics" / "rec.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"broken/metrics/rec.json: not valid JSON"):
        report.results_table(str(broken))


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"  # The first chunk of a valid PNG.
    return struct.unpack(">II", data[16:24])


def test_command_line_writes_table_and_chart(runs, tmp_path, capsys):
    rsllm, gru, tallrec = runs
    out, plot = tmp_path / "report.md", tmp_path / "hit_ratio.png"
    report.main([
        rsllm, gru, tallrec, "--out",
        str(out), "--plot",
        str(plot), "--label", f"{tallrec}=TALLRec (ours)", "--backbones"
    ])
    printed = capsys.readouterr().out
    assert printed == out.read_text()
    assert _cells(printed, "TALLRec (ours)")[-1] == "—"
    assert _cells(printed, "SASRec")[0] == "LastFM"  # The RSLLM run's backbone row.
    width, height = _png_size(plot)
    assert width > 100 and height > 100


def test_command_line_reports_bad_directory_and_label(tmp_path, runs, capsys):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(SystemExit):
        report.main([str(empty)])
    assert "empty_run: no metrics" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report.main([runs[0], "--label", "no_equals_sign"])
    assert "expected RUNDIR=NAME" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report.main([runs[0], "--label", f"{tmp_path / 'other'}=X"])
    assert "not in the report" in capsys.readouterr().err


def test_chart_with_missing_values_and_no_paper_rows(tmp_path):
    run = _write_run(tmp_path / "synthetic", _config(dataset="synthetic"),
                     evaluation=_eval_metrics(hit_ratio_at_1=None))
    rows = report.collect_rows([run])
    assert rows[0].paper is None and "HitRatio@1" not in rows[0].values
    plot = tmp_path / "chart.png"
    report.plot_hit_ratio(rows, str(plot))
    assert plot.stat().st_size > 0 and _png_size(plot)[0] > 0


def test_runs_that_differ_only_in_the_seed_merge_into_mean_and_std(tmp_path):
    """LLM rows over seeds: one row, the mean ± sample std of each column; a run with another
    config (here γ = 0) stays a row of its own."""
    dirs = []
    for seed, hit in ((0, 0.40), (1, 0.50), (2, 0.60)):
        config = dict(_config(), seed=seed, workdir=f"runs/seed{seed}")
        dirs.append(
            _write_run(tmp_path / f"seed{seed}", config,
                       evaluation=_eval_metrics(hit_ratio_at_1=hit)))
    dirs.append(
        _write_run(tmp_path / "other", dict(_config(gamma=0.0), seed=0),
                   evaluation=_eval_metrics(hit_ratio_at_1=0.3)))
    rows = report.collect_rows(dirs)
    assert [(row.method, row.num_runs) for row in rows] == [("RSLLM (SASRec)", 3),
                                                            ("RSLLM (SASRec) U-I only", 1)]
    mean, std = rows[0].values["HitRatio@1"]
    assert mean == pytest.approx(0.5) and std == pytest.approx(0.1)  # Sample std (ddof 1).
    assert rows[0].values["ValidRatio"] == (pytest.approx(0.9918), pytest.approx(0.0))
    table = report.format_table(rows)
    assert _cells(table, "RSLLM (SASRec) (3 seeds)")[2] == "0.5000 ± 0.1000"
    assert _cells(table, "RSLLM (SASRec) U-I only")[2] == "0.3000"


def test_rows_over_the_same_seeds_are_compared_paired_by_seed(tmp_path):
    """The paired table: RSLLM − TALLRec over the seeds both ran, by hand; a seed only one row
    ran is left out, and rows with under two common seeds are not compared."""

    def write(name, config, seed, **measures):
        return _write_run(tmp_path / f"{name}{seed}", dict(config, seed=seed),
                          evaluation=_eval_metrics(**measures))

    tallrec = _config(stage1="text", stage2="text", gamma=0.0, beta=0.0)
    dirs = [
        write("tallrec", tallrec, s, rank_hit_ratio_at_1=r, hit_ratio_at_1=h)
        for s, r, h in ((0, 0.20, 0.30), (1, 0.25, 0.30), (2, 0.30, 0.30), (3, 0.9, 0.9))
    ]
    dirs += [
        write("rsllm", _config(), s, rank_hit_ratio_at_1=r, hit_ratio_at_1=h)
        for s, r, h in ((0, 0.40, 0.30), (1, 0.40, 0.30), (2, 0.55, 0.30))
    ]
    dirs.append(write("ui", _config(gamma=0.0), 0, rank_hit_ratio_at_1=0.5))
    rows = report.collect_rows(dirs, labels={d: "TALLRec" for d in dirs[:4]})
    # Differences 0.20, 0.15, 0.25 (seed 3 is TALLRec's alone): mean 0.20, std 0.05, SE 0.05/√3.
    mean, error, seeds = report.paired_difference(rows[1], rows[0], "ranking HR@1")
    assert (mean, error, seeds) == (pytest.approx(0.2), pytest.approx(0.05 / 3**0.5), 3)
    table = report.format_table(rows)
    cells = _cells(table, "RSLLM (SASRec) − TALLRec")
    assert cells[2] == "3"
    assert cells[3] == "+0.0000 ± 0.0000"  # The paper's rule: equal on every seed.
    assert cells[5] == "+0.2000 ± 0.0289 (+6.9 SE)"
    assert "U-I only −" not in table  # One seed: nothing to pair.
    assert report.format_paired_table(rows[:1]) == ""


def test_whole_catalogue_table_only_for_runs_that_measured_it(runs, tmp_path):
    rsllm, gru, _ = runs
    assert "re-ranked HR@10" not in report.results_table([rsllm, gru])
    full = _write_run(
        tmp_path / "full", _config(), rec=_rec_metrics(),
        evaluation=_eval_metrics(retrieve_k=50, catalogue_recall_at_k=0.62,
                                 catalogue_rec_hit_ratio_at_10=0.21, catalogue_rec_ndcg_at_10=0.11,
                                 catalogue_rerank_hit_ratio_at_10=0.25,
                                 catalogue_rerank_ndcg_at_10=0.131))
    table = report.results_table([rsllm, full], labels={full: "RSLLM, whole catalogue"})
    catalogue = table[table.index("| dataset | method | K |"):]
    assert _cells(catalogue, "RSLLM, whole catalogue") == [
        "LastFM", "RSLLM, whole catalogue", "50", "0.6200", "0.2100", "0.1100", "0.2500", "0.1310"
    ]
    assert "RSLLM (SASRec)" not in catalogue  # The other run did not measure it.


def test_rows_over_several_seeds_list_each_run(tmp_path):
    """The per-seed table: every run behind a merged row with its own figures and folder, in
    seed order; a one-seed row is not repeated there, and no table when nothing merged."""
    dirs = [
        _write_run(tmp_path / f"seed{seed}", dict(_config(), seed=seed),
                   evaluation=_eval_metrics(rank_hit_ratio_at_1=rank, hit_ratio_at_1=0.25))
        for seed, rank in ((2, 0.55), (0, 0.40), (1, 0.45))
    ]
    dirs.append(
        _write_run(tmp_path / "ui", dict(_config(gamma=0.0), seed=0),
                   evaluation=_eval_metrics(rank_hit_ratio_at_1=0.3)))
    rows = report.collect_rows(dirs)
    seed_table = report.format_table(rows).split("Per seed")[0].split("| seed |")[1]
    lines = [line for line in seed_table.splitlines() if "RSLLM" in line]
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    ranking = report.COLUMNS.index("ranking HR@1") + 1  # After the seed column.
    assert [(c[1], c[2], c[ranking], c[-1]) for c in cells] == [
        ("RSLLM (SASRec)", "0", "0.4000", dirs[1]),
        ("RSLLM (SASRec)", "1", "0.4500", dirs[2]),
        ("RSLLM (SASRec)", "2", "0.5500", dirs[0]),
    ]
    assert report.format_seed_table(rows[1:], ["ranking HR@1"]) == ""
