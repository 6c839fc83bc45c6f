"""The eval step: answer rules on hand-made examples, and the step itself on a small run."""

import json
import os
from unittest import mock

import numpy as np
import pytest

from configs import demo
from rsllm_jax import main, run_paths
from rsllm_jax.evaluation import answers, evaluate
from rsllm_jax.models import decode
from rsllm_jax.recommenders import save_item_embeddings

TITLES = ["Tavo", "Tavo Lumen", "The Beatles", "Björk", "AC/DC"]


@pytest.mark.parametrize(
    "generated, matched, valid, hit",
    [
        (" The Beatles", (2, ), True, False),
        ("the beatles\nTavo", (2, ), True, False),  # Only the first line counts.
        ("  THE BEATLES  ", (2, ), True, False),  # Case and surrounding spaces do not matter.
        ("Tavo", (0, ), True, True),
        ("Tavo Lumen", (0, 1), False, False),  # "Tavo" is a substring of "Tavo Lumen".
        ("Björk or AC/DC", (3, 4), False, False),  # Names two candidates.
        ("I would say björk!", (3, ), True, False),  # Substring inside a sentence.
        ("Nothing here", (), False, False),
        ("", (), False, False),
    ])
def test_paper_rule(generated, matched, valid, hit):
    judged = answers.paper_match(generated, TITLES, target_title="Tavo")
    assert (judged.matched, judged.valid, judged.hit) == (matched, valid, hit)


def test_paper_rule_compares_titles_and_empty_titles_match_everything():
    # An empty title is a substring of every answer: with it among the candidates no answer
    # that names another candidate is valid (the quirk the strict rule removes).
    titles = ["", "Tavo"]
    assert answers.paper_match("Tavo", titles, "Tavo").matched == (0, 1)
    assert not answers.paper_match("Tavo", titles, "Tavo").valid
    assert answers.paper_match("xyz", titles, "").hit  # Only "" matches: valid, and a hit.
    # Hit is decided on titles, as in the paper's code: a duplicate title counts as the target.
    assert answers.paper_match("Kora", ["Mabu", "Kora"], "kora ").hit


@pytest.mark.parametrize(
    "generated, matched, valid, hit",
    [
        ("Tavo", (0, ), True, True),
        ("Tavo Lumen", (1, ), True, False),  # Exact title: no substring collision.
        ("  tavo\t lumen ", (1, ), True, False),  # Whitespace runs and case normalised.
        ("Tavo Lumen!", (), False, False),
        ("Björk or AC/DC", (), False, False),
        ("BJÖRK\nmore text", (3, ), True, False),
    ])
def test_strict_rule(generated, matched, valid, hit):
    judged = answers.strict_match(generated, TITLES, target_index=0)
    assert (judged.matched, judged.valid, judged.hit) == (matched, valid, hit)


def test_ratios_are_fractions_of_all_rows():
    judged = [
        answers.Judgement((0, ), True, True),
        answers.Judgement((1, ), True, False),
        answers.Judgement((), False, False),
        answers.Judgement((0, 1), False, False)
    ]
    assert answers.ratios(judged) == (0.5, 0.25)
    # LLaRA's calculate_hr1 prints hits / valid answers: 1 of 2.
    assert answers.hit_ratio_among_valid(judged) == 0.5
    assert answers.hit_ratio_among_valid(judged[2:]) == 0.0


def _small_config(**eval_overrides):
    config = demo.get_config()
    config.jobs = "prepare,eval"
    config.data.synthetic.num_users = 60
    config.data.synthetic.num_items = 50
    config.model.demo_vocab_size = 400
    config.pretrain.steps = 0  # The random-init base itself.
    config.prompts.length_buckets = "256,512"
    config.eval.batch_size = 4
    config.eval.max_new_tokens = 8
    for key, value in eval_overrides.items():
        config.eval[key] = value
    return config


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("eval"))
    config = _small_config(stage="base", item_format="hybrid")
    # The hybrid format reads behavioural embeddings: a random table in place of the rec step.
    table = np.random.default_rng(0).normal(size=(51, 64))
    config.prompts.item_embeddings = save_item_embeddings(os.path.join(workdir, "table.npy"), table,
                                                          num_items=50, model="random",
                                                          source="test")
    results = main.run_pipeline(config, workdir)
    return config, workdir, results["eval"]


def test_eval_step_writes_metrics_and_predictions(base_run):
    config, workdir, metrics = base_run
    assert metrics["split"] == "test" and metrics["stage"] == "base"
    assert metrics["item_format"] == "hybrid" and metrics["n"] == 6
    with open(run_paths.predictions_path(workdir, "test")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == metrics["n"] and len({r["row_id"] for r in rows}) == len(rows)
    assert metrics["valid_ratio"] == np.mean([r["valid"] for r in rows])
    assert metrics["hit_ratio_at_1"] == np.mean([r["hit"] for r in rows])
    assert metrics["strict_hit_ratio_at_1"] == np.mean([r["strict_hit"] for r in rows])
    valid = [r for r in rows if r["valid"]]
    assert metrics["hit_ratio_among_valid"] == (np.mean([r["hit"]
                                                         for r in valid]) if valid else 0.0)
    # Constrained decoding always names exactly one candidate.
    assert metrics["constrained_valid_ratio"] == 1.0
    assert metrics["rank_hit_ratio_at_1"] == np.mean([r["target_rank"] == 0 for r in rows])
    assert metrics["rank_hit_ratio_at_10"] >= metrics["rank_hit_ratio_at_5"] >= \
        metrics["rank_hit_ratio_at_3"] >= metrics["rank_hit_ratio_at_1"]
    for r in rows:
        assert r["ranked"][0] == r["target"] or r["target_rank"] > 0
    recorded = json.load(open(os.path.join(workdir, "metrics", "eval.json")))
    assert recorded["metrics"] == metrics


def test_evaluated_prompts_are_the_training_prompts(base_run):
    """The prompt given to the model is the training prompt up to "The answer is", and the
    constrained answers are candidates' titles."""
    config, workdir, _ = base_run
    from rsllm_jax.data.pipeline import BatchIterator
    from rsllm_jax.data.storage import PreparedDataset

    dataset = PreparedDataset(os.path.join(workdir, "data"))
    evaluator = evaluate.Evaluator.from_workdir(config, workdir, dataset, "base")
    rows = next(iter(BatchIterator(dataset, "test", 4, process_index=0, process_count=1)))
    prompts = evaluator.encoder.encode_batch(rows)
    tokens, mask, embeddings = evaluator.prompt_arrays(prompts)
    for i, p in enumerate(prompts):
        assert list(tokens[i][mask[i]]) == p.tokens[:p.prompt_length]
        placeholders = [pos for pos, _ in p.placeholders]
        assert placeholders and max(placeholders) < p.prompt_length
    _, _, texts, scores = evaluator.answer_all(prompts, rows["candidates"][:len(prompts)], 4, 8,
                                               generation=False)
    assert scores.shape == (len(prompts), rows["candidates"].shape[1])
    for i, text in enumerate(texts):
        titles = {dataset.catalogue.title(int(c)) for c in rows["candidates"][i]}
        assert text.strip() in titles


def test_unknown_stage_and_missing_stage_are_clear_errors(base_run, tmp_path):
    config, workdir, _ = base_run
    config = _small_config(stage="stage3")
    with pytest.raises(ValueError, match="config.eval.stage='stage3'"):
        evaluate.resolve_stage(config, workdir)
    config = _small_config(stage="stage2")
    with pytest.raises(FileNotFoundError, match="no trained parameters"):
        evaluate.evaluate(config, workdir)


def test_greedy_answers_do_not_depend_on_the_other_measures(base_run):
    """Free generation gives the same answers whether constrained decoding and the ranking
    share its prompt cache or not (the cache is sized for the longest of them)."""
    config, workdir, _ = base_run
    from rsllm_jax.data.storage import PreparedDataset

    dataset = PreparedDataset(os.path.join(workdir, "data"))
    evaluator = evaluate.Evaluator.from_workdir(config, workdir, dataset, "base")
    alone, rows_alone = evaluator.evaluate_split(dataset, "test", 4, 8, constrained=False,
                                                 ranking_by_likelihood=False)
    together, rows_together = evaluator.evaluate_split(dataset, "test", 4, 8)
    assert [r["generated"] for r in rows_alone] == [r["generated"] for r in rows_together]
    for key in ("valid_ratio", "hit_ratio_at_1", "strict_hit_ratio_at_1"):
        assert alone[key] == together[key]


def test_answers_do_not_depend_on_the_number_of_slots(base_run):
    """6 rows with 4 and with 2 answers in flight (the last slots filling as answers end):
    the same answers, constrained choices and ranks, each prompt prefilled once (after the
    start all share, run once)."""
    config, workdir, _ = base_run
    from rsllm_jax.data.storage import PreparedDataset

    dataset = PreparedDataset(os.path.join(workdir, "data"))
    evaluator = evaluate.Evaluator.from_workdir(config, workdir, dataset, "base")
    prefilled, prefill = [], decode.prefill
    with mock.patch.object(
            decode, "prefill",
            lambda *args, **kwargs: prefilled.append(kwargs["prefix"] is None) or prefill(
                *args, **kwargs)):
        _, four = evaluator.evaluate_split(dataset, "test", 4, 8)
    assert len(four) == 6 and prefilled == [True] + [False] * 6
    _, two = evaluator.evaluate_split(dataset, "test", 2, 8)
    for key in ("row_id", "generated", "generated_tokens", "constrained", "target_rank", "ranked"):
        assert [r[key] for r in four] == [r[key] for r in two], key


def test_a_shared_start_run_once_changes_no_answer(base_run):
    """Every prompt continuing the cache of the start all prompts share gives the answers,
    constrained choices and candidate scores of the whole prompts run alone."""
    config, workdir, _ = base_run
    from rsllm_jax.data.pipeline import BatchIterator
    from rsllm_jax.data.storage import PreparedDataset

    dataset = PreparedDataset(os.path.join(workdir, "data"))
    evaluator = evaluate.Evaluator.from_workdir(config, workdir, dataset, "base")
    rows = next(iter(BatchIterator(dataset, "test", 6, process_index=0, process_count=1)))
    prompts = evaluator.encoder.encode_batch(rows)
    shared = evaluator.shared_start(prompts)
    first_placeholder = min(pos for p in prompts for pos, _ in p.placeholders)
    assert 0 < shared <= first_placeholder
    assert all(p.tokens[:shared] == prompts[0].tokens[:shared] for p in prompts)
    # The longest such start: the prompts differ right after it, or it ends where it must.
    differs = len({p.tokens[shared] for p in prompts}) > 1
    assert differs or shared in (first_placeholder, min(p.prompt_length for p in prompts) - 1)
    candidates = rows["candidates"][:len(prompts)]
    texts, lengths, chosen, scores = evaluator.answer_all(prompts, candidates, 3, 8)
    with mock.patch.object(evaluator, "shared_start", lambda prompts: 0):
        alone = evaluator.answer_all(prompts, candidates, 3, 8)
    assert texts == alone[0] and chosen == alone[2]
    np.testing.assert_array_equal(lengths, alone[1])
    np.testing.assert_allclose(scores, alone[3], rtol=1e-5, atol=1e-4)


def test_evaluation_never_imports_training():
    """The layers run one way: training may use evaluation (epoch selection), never the
    reverse. A fresh interpreter, so modules other tests imported do not count."""
    import subprocess
    import sys

    code = ("import sys; import rsllm_jax.evaluation.evaluate, rsllm_jax.evaluation."
            "catalogue_ranking, rsllm_jax.run_folder, rsllm_jax.recommend, rsllm_jax.export; "
            "print(sorted(m for m in sys.modules if m.startswith('rsllm_jax.training')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]", out
