"""The recommend command and the whole-catalogue evaluation on a tiny finished run: titles
resolve or fail naming the closest ones; retrieval is the recommender's top K outside the
history; re-ranking scores equal full forward passes; batching and chunking change nothing; the
eval step's whole-catalogue metrics are what `recommend` gives row by row."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest

from rsllm_jax import recommend, run_paths
from rsllm_jax.data.catalogue import Catalogue
from rsllm_jax.data.storage import PreparedDataset
from rsllm_jax.data.titles import TitleIndex, UnknownItemError
from rsllm_jax.evaluation import catalogue_ranking, ranking
from rsllm_jax.recommenders import saved, train

K = 12  # tests/tiny_run.py: config.eval.retrieve_k


def test_titles_resolve_exactly_then_ignoring_case_and_spaces():
    index = TitleIndex(
        Catalogue(titles=("Björk", "The Beatles", "Tavo", "tavo", "Moby", "Moby", "Tavo Lumen", ""),
                  domain="artists"))
    assert index.item_id("Björk") == 0 and index.item_id("  the   BEATLES ") == 1
    assert index.item_id("Tavo") == 2 and index.item_id("tavo") == 3  # Exact first.
    assert index.item_id(6) == 6
    with pytest.raises(UnknownItemError, match=r"'TAVO' is ambiguous: it names 'Tavo' \(id 2\), "
                       r"'tavo' \(id 3\)"):
        index.item_id("TAVO")
    with pytest.raises(UnknownItemError, match=r"'Moby' is ambiguous.*\(id 4\).*\(id 5\)"):
        index.item_id("Moby")
    with pytest.raises(UnknownItemError, match=r"no item is titled 'Bjork'; closest titles: "
                       r"'Björk'"):
        index.item_id("Bjork")
    with pytest.raises(UnknownItemError, match=r"'beatles'.*closest titles: .*'The Beatles'"):
        index.item_id("beatles")
    with pytest.raises(UnknownItemError, match=r"no item is titled ''"):
        index.item_id("")  # An empty title names nothing.
    with pytest.raises(UnknownItemError, match=r"item id 8 is outside the catalogue \[0, 8\)"):
        index.item_id(8)


@pytest.fixture(scope="module")
def recommender(tiny_run):
    workdir, _, _ = tiny_run
    return recommend.Recommender.from_workdir(workdir)


def _test_rows(workdir):
    rows = PreparedDataset(os.path.join(workdir, "data")).read("test")
    return [h[:n].tolist() for h, n in zip(rows["history"], rows["history_len"])], rows


def _full_forward_log_likelihood(evaluator, prompt, item):
    """log p(title + EOS | prompt) from one forward pass over prompt and answer (no cache)."""
    title, eos = evaluator.encoder.answer_tokens(item)
    answer = title + eos
    tokens = prompt.tokens[:prompt.prompt_length] + answer
    whole = dataclasses.replace(prompt, tokens=tokens, prompt_length=len(tokens))
    _, mask, embeddings = evaluator.prompt_arrays([whole])
    logits = evaluator.llm.apply(evaluator.llm_variables, None, embeddings=embeddings,
                                 attention_mask=mask).logits[0, -len(tokens):]
    log_probs = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    start = prompt.prompt_length  # Answer token j is predicted at position start + j - 1.
    return sum(log_probs[start + j - 1, t] for j, t in enumerate(answer))


def test_retrieval_is_the_recommenders_top_k_outside_the_history(tiny_run, recommender):
    workdir, config, _ = tiny_run
    histories, _ = _test_rows(workdir)
    history = histories[0]
    model, params, _ = saved.load_recommender(config, workdir, recommender.catalogue.num_items,
                                              run_paths.item_embeddings_path(workdir))
    padded, length = recommender.padded_histories([history])
    scores = np.asarray(train.make_score_fn(model)(params, padded, length))[0]
    allowed = [i for i in np.argsort(-scores, kind="stable") if i not in set(history)]
    alone = recommender.recommend(history, top=5, rerank=False)
    assert [r["item_id"] for r in alone.items] == allowed[:5]
    np.testing.assert_allclose([r["score"] for r in alone.items], scores[allowed[:5]], rtol=1e-6)
    reranked = recommender.recommend(history, top=K, retrieve=K)
    assert sorted(r["item_id"] for r in reranked.items) == sorted(allowed[:K])
    llm_scores = [r["score"] for r in reranked.items]
    assert llm_scores == sorted(llm_scores, reverse=True)
    # The same history as titles, in any spelling the index accepts.
    titles = [recommender.catalogue.title(i).upper() for i in history]
    assert recommender.recommend(titles, top=K, retrieve=K).items == reranked.items


def test_reranking_scores_equal_full_forward_passes(tiny_run, recommender):
    """The cached, chunked scoring of K candidates gives each title's log-likelihood given the
    prompt that lists the K candidates in `prompt_order`."""
    workdir, _, _ = tiny_run
    history = _test_rows(workdir)[0][1]
    result = recommender.recommend(history, top=K, retrieve=K)
    retrieved = [r["item_id"] for r in recommender.recommend(history, top=K, rerank=False).items]
    listed = np.asarray(retrieved[:K])[catalogue_ranking.prompt_order(history, K)]
    evaluator = recommender.evaluator
    prompt = evaluator.encoder.encode(history, listed, int(listed[0]))
    for item in result.items[:3]:
        np.testing.assert_allclose(_full_forward_log_likelihood(evaluator, prompt, item["item_id"]),
                                   item["score"], atol=1e-4)


def test_batches_and_chunks_change_nothing(tiny_run, recommender):
    workdir, _, _ = tiny_run
    histories = _test_rows(workdir)[0][:3]
    one_by_one = [recommender.recommend(h, top=K, retrieve=K) for h in histories]
    requests = [dict(history=h) for h in histories]
    batched = recommender.recommend_many(requests, top=K, retrieve=K, batch_size=2)
    chunked = recommend.Recommender(recommender.evaluator, recommender.dataset, "stage2", None,
                                    pairs_per_call=5)
    chunked.score_items = recommender.score_items
    for reference, *others in zip(one_by_one, batched,
                                  chunked.recommend_many(requests, top=K, retrieve=K)):
        for other in others:
            assert [r["item_id"] for r in other.items] == [r["item_id"] for r in reference.items]
            np.testing.assert_allclose([r["score"] for r in other.items],
                                       [r["score"] for r in reference.items], atol=1e-5)


def test_given_candidates_are_the_ones_ranked(recommender):
    catalogue = recommender.catalogue
    given = [catalogue.title(i) for i in (4, 9, 2)] + [9]  # A duplicate is dropped.
    result = recommender.recommend([1, 5, 7], candidates=given)
    assert sorted(r["item_id"] for r in result.items) == [2, 4, 9]
    assert result.num_candidates == 3 and result.history == [1, 5, 7]
    assert [r["rank"] for r in result.items] == [1, 2, 3]


def test_equal_likelihoods_keep_the_recommenders_order(monkeypatch):
    # Items that share a title get the same log-likelihood from a titles-only prompt; the
    # re-ranking then keeps the recommender's order among them, not the prompt's random one.
    title = {5: "A", 2: "B", 9: "A", 7: "C", 3: "B"}
    log_likelihood = {"A": -1.0, "B": -2.0, "C": -3.0}
    monkeypatch.setattr(
        catalogue_ranking, "likelihood_scores", lambda evaluator, histories, listed, *_:
        ([np.array([log_likelihood[title[int(i)]] for i in ids])
          for ids in listed], ["prompt"] * len(listed)))
    retrieved, history = np.array([5, 2, 9, 7, 3]), [0, 6]
    shown = retrieved[catalogue_ranking.prompt_order(history, 5)].tolist()
    # The prompt lists 9 before 5 and 3 before 2: the opposite of the recommender's order.
    assert shown.index(9) < shown.index(5) and shown.index(3) < shown.index(2)
    [(ids, scores)], _ = catalogue_ranking.rerank(None, [history], [retrieved])
    assert ids.tolist() == [5, 9, 2, 3, 7]
    assert scores.tolist() == [-1.0, -1.0, -2.0, -2.0, -3.0]


def test_whole_catalogue_eval_metrics_are_what_recommend_gives(tiny_run, recommender):
    workdir, _, results = tiny_run
    metrics = results["eval"]
    histories, rows = _test_rows(workdir)
    rec_ranks, rerank_ranks = [], []
    for history, target in zip(histories, rows["target"]):
        alone = [
            r["item_id"] for r in recommender.recommend(
                history, top=recommender.catalogue.num_items, rerank=False).items
        ]
        reranked = [r["item_id"] for r in recommender.recommend(history, top=K, retrieve=K).items]
        rec_ranks.append(alone.index(target) if target in alone else 10**9)
        rerank_ranks.append(reranked.index(target) if target in reranked else 10**9)
    assert metrics["retrieve_k"] == K and metrics["n"] == len(histories)
    for name, ranks in (("rec", rec_ranks), ("rerank", rerank_ranks)):
        assert metrics[f"catalogue_{name}_hit_ratio_at_10"] == pytest.approx(
            ranking.hit_ratio(np.asarray(ranks), 10).mean())
        assert metrics[f"catalogue_{name}_ndcg_at_10"] == pytest.approx(
            ranking.ndcg(np.asarray(ranks), 10).mean())
    assert metrics["catalogue_recall_at_k"] == pytest.approx(np.mean(np.asarray(rec_ranks) < K))
    assert metrics["catalogue_target_in_history"] == pytest.approx(
        np.mean([t in h for t, h in zip(rows["target"], histories)]))
    with open(os.path.join(workdir, "metrics", "predictions_test.jsonl")) as f:
        predictions = [json.loads(line) for line in f]
    assert [p["catalogue_rerank_rank"] for p in predictions] == \
        [None if r == 10 ** 9 else r for r in rerank_ranks]


def test_rec_step_keeps_the_recommender_and_older_runs_still_load(tiny_run, tmp_path):
    workdir, config, results = tiny_run
    dataset = PreparedDataset(os.path.join(workdir, "data"))
    num_items, table = dataset.catalogue.num_items, run_paths.item_embeddings_path(workdir)
    model, params, source = saved.load_recommender(config, workdir, num_items, table)
    assert "seed 0" in source
    test = train.evaluate(train.make_score_fn(model), params, dataset, "test")
    assert test["hit_ratio_at_1"] == results["rec"]["test"]["hit_ratio_at_1"]
    # A run made before the rec step kept it: the chosen seed's checkpoint has it.
    older = tmp_path / "older"
    shutil.copytree(os.path.join(workdir, "rec"), older / "rec")
    shutil.copytree(os.path.join(workdir, "metrics"), older / "metrics")
    shutil.rmtree(older / "rec" / "recommender")
    _, restored, source = saved.load_recommender(config, str(older), num_items, table)
    assert "best_params" in source
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored,
                 params)
    other = np.random.default_rng(0).normal(size=(num_items + 1, 64))
    from rsllm_jax.recommenders import save_item_embeddings

    path = save_item_embeddings(tmp_path / "other.npy", other, num_items=num_items, model="x",
                                source="test")
    with pytest.raises(ValueError, match="item embeddings differ from .*other.npy"):
        saved.load_recommender(config, workdir, num_items, path)


def test_command_line(recommender, tiny_run, tmp_path, monkeypatch, capsys):
    workdir, _, _ = tiny_run
    monkeypatch.setattr(recommend.Recommender, "from_workdir",
                        classmethod(lambda cls, *args, **kwargs: recommender))
    titles = [recommender.catalogue.title(i) for i in (3, 8, 1)]
    recommend.main(["--workdir", workdir, "--history", " | ".join(titles), "--top", "3"])
    text = capsys.readouterr().out
    assert text.startswith(f"History: {' | '.join(titles)}") and text.count("[id ") == 3
    recommend.main(["--workdir", workdir, "--history_ids", "3,8,1", "--top", "3", "--json"])
    as_json = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in as_json["recommendations"]] == [1, 2, 3]
    assert as_json == recommender.recommend([3, 8, 1], top=3).to_json()

    users = tmp_path / "users.jsonl"
    users.write_text(
        json.dumps(dict(id="a", history=titles)) + "\n\n" +
        json.dumps(dict(history=[3, 8], candidates=[titles[0], 9])) + "\n")
    out = tmp_path / "recs.jsonl"
    recommend.main(
        ["--workdir", workdir, "--input",
         str(users), "--output",
         str(out), "--top", "2"])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == ["a", 3]  # Given ids, else the line number.
    assert sorted(r["item_id"] for r in lines[1]["recommendations"]) == [3, 9]

    def fails(*args):
        with pytest.raises(SystemExit) as exit_info:
            recommend.main(["--workdir", workdir, *args])
        assert exit_info.value.code == 2
        return capsys.readouterr().err

    typo = titles[0][:-1]
    assert f"user 0: no item is titled {typo!r}; closest titles: {titles[0]!r}" in \
        fails("--history", typo)
    users.write_text('{"history": [1, 2]}\n{"items": [1]}\n')
    assert f"{users} line 2: expected an object with a \"history\" list" in \
        fails("--input", str(users))
    recommender.evaluator.encoder.max_length = 60  # Far too short for K = 12 candidates.
    try:
        assert "user 0: the prompt needs" in fails("--history_ids", "3,8", "--retrieve", "12")
    finally:
        recommender.evaluator.encoder.max_length = 1024
