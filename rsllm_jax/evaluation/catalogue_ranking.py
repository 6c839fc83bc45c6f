"""Ranking the whole catalogue: the recommender retrieves, the LLM re-ranks.

The paper's protocol ranks 20 candidates (19 random negatives and the true item); a deployed
recommender has no candidates given. Here the run's recommender scores every item for a
history, the items of the history (and items no prompt may name: empty titles) are excluded,
and its top K are re-ranked by the LLM: the prompt lists the K items as its candidates and
each candidate's title + EOS is scored by its log-likelihood given the prompt, as the eval
step ranks its 20 candidates. The prompt is run once into a KV cache that the candidates share,
scored a block of candidates at a time.

The K items are listed in the prompt in a random order drawn from the history (the same
history always gives the same prompt), never in the recommender's order: training placed the
true item at a random slot among the candidates, and the recommender's ranking would tell the
LLM which items the recommender prefers.

`recommend` (rsllm_jax/recommend.py) and the eval step's full-catalogue metrics
(`config.eval.retrieve_k > 0`) both use these functions.
"""

import numpy as np

from rsllm_jax.evaluation import ranking
from rsllm_jax.prompts.encoding import PromptTooLongError

# (prompt, candidate) continuations scored per call: the eval step's ranking of 20 candidates
# at its default batch of 8 prompts, so re-ranking K candidates needs no more memory.
PAIRS_PER_CALL = 160
_ORDER_SALT = 0xCA7A1  # Mixed into the order's random stream, apart from other uses of ids.
CUTOFF = 10  # HitRatio@10 and NDCG@10 over the catalogue.


def retrieve(scores, histories, k, excluded=()):
    """Per row, the ids of the `k` best-scored items (descending; ties: the smaller id first)
    outside the row's history and `excluded`, with their scores. `scores` (n, num_items)."""
    scores = np.asarray(scores, np.float64)
    out = []
    for row, history in zip(scores, histories):
        allowed = np.ones(row.shape[0], bool)
        allowed[[int(i) for i in history if 0 <= int(i) < row.shape[0]]] = False
        allowed[list(excluded)] = False
        ids = np.flatnonzero(allowed)
        order = ids[np.argsort(-row[ids], kind="stable")][:k]
        out.append((order, row[order]))
    return out


def prompt_order(history, count):
    """The order in which `count` retrieved items are listed in the prompt: a permutation drawn
    from the history (see the module docstring)."""
    rng = np.random.default_rng([_ORDER_SALT, len(history), *[int(i) for i in history]])
    return rng.permutation(count)


def likelihood_scores(evaluator, histories, candidate_lists, row_ids=None,
                      pairs_per_call=PAIRS_PER_CALL):
    """(scores, prompts): each candidate's log-likelihood (title + EOS) given the prompt of its
    row, which lists that row's candidates in the order given; one prompt per history.

    `evaluator` is an `evaluation.evaluate.Evaluator`. The length policy is the prompts': the
    oldest history items are dropped to fit `max_length` (each prompt's
    `num_history_dropped`), and a row whose candidates alone do not fit raises
    PromptTooLongError naming it.
    """
    encoder = evaluator.encoder
    row_ids = list(range(len(histories))) if row_ids is None else list(row_ids)
    answers = [[sum(encoder.answer_tokens(int(c)), []) for c in candidates]
               for candidates in candidate_lists]
    prompts = []
    for history, candidates, row_answers, row_id in zip(histories, candidate_lists, answers,
                                                        row_ids):
        # The longest answer as the target: the length check then covers every candidate.
        longest = candidates[int(np.argmax([len(a) for a in row_answers]))]
        prompts.append(encoder.encode(history, candidates, longest, row_id))
    tokens, mask, embeddings = evaluator.prompt_arrays(prompts)
    steps = -(-max(len(a) for row in answers for a in row) // 8) * 8  # Few distinct shapes.
    prefilled = evaluator.prefill(tokens, mask, embeddings)
    most = max(len(row) for row in answers)
    # Blocks of equal width: 200 candidates at 160 per call are 2 × 100, not 160 + 40 padded.
    calls = -(-most // max(1, pairs_per_call // len(prompts)))
    width = -(-most // calls)
    scores = [np.zeros(len(row), np.float64) for row in answers]
    for start in range(0, most, width):
        block = np.full((len(prompts), width, steps), -1, np.int32)
        for i, row in enumerate(answers):
            for j, answer in enumerate(row[start:start + width]):
                block[i, j, :len(answer)] = answer
        block_scores = evaluator.score(prefilled, block, block >= 0)
        for i, row in enumerate(answers):
            n = len(row[start:start + width])
            scores[i][start:start + n] = block_scores[i, :n]
    return scores, prompts


def rerank(evaluator, histories, candidates, shuffle=True, row_ids=None,
           pairs_per_call=PAIRS_PER_CALL):
    """Orders each row's candidate ids by the LLM: (ids, their log-likelihoods, prompts).

    With `shuffle` (one bool, or one per row) a row's candidates are listed in the prompt in
    `prompt_order` (retrieved items), else in the order given (candidates a user named). Ties
    keep the order given.
    """
    shuffle = [shuffle] * len(histories) if isinstance(shuffle, bool) else list(shuffle)
    candidates = [np.asarray(ids) for ids in candidates]
    listed = [
        ids[prompt_order(history, len(ids))] if mix else ids
        for history, ids, mix in zip(histories, candidates, shuffle)
    ]
    scores, prompts = likelihood_scores(evaluator, histories, listed, row_ids, pairs_per_call)
    out = []
    for ids, shown, row_scores in zip(candidates, listed, scores):
        by_id = dict(zip(shown.tolist(), row_scores.tolist()))
        llm = np.array([by_id[int(i)] for i in ids])
        order = np.argsort(-llm, kind="stable")
        out.append((ids[order], llm[order]))
    return out, prompts


def full_catalogue_metrics(evaluator, score_fn, rows, k, batch_size, excluded=()):
    """HitRatio@10 / NDCG@10 over the whole catalogue for the recommender alone and for its top
    `k` re-ranked by the LLM, on `rows` (a split as `PreparedDataset.read` returns it);
    `score_fn(history, history_len)` gives the recommender's (n, num_items) scores.

    Returns (metrics, {row id: per-row ranks}). A target in its own history or among
    `excluded` cannot be recommended: it counts as a miss for both.
    """
    rec_ranks, rerank_ranks, per_row, repeated = [], [], {}, 0
    n = len(rows["target"])
    for start in range(0, n, batch_size):
        part = slice(start, min(start + batch_size, n))
        histories = [h[:m] for h, m in zip(rows["history"][part], rows["history_len"][part])]
        scores = np.asarray(score_fn(rows["history"][part], rows["history_len"][part]))
        history_of = {int(r): h.tolist() for r, h in zip(rows["row_id"][part], histories)}
        everything = retrieve(scores, histories, scores.shape[1], excluded)
        top = [(ids[:k], s[:k]) for ids, s in everything]
        try:
            reranked, prompts = rerank(evaluator, histories, [ids for ids, _ in top],
                                       row_ids=rows["row_id"][part])
        except PromptTooLongError as e:
            raise PromptTooLongError(f"config.eval.retrieve_k={k}: {e}; lower retrieve_k or "
                                     "raise config.prompts.max_length") from None
        for target, row_id, (ids, _), (llm_ids, _), prompt in zip(rows["target"][part],
                                                                  rows["row_id"][part], everything,
                                                                  reranked, prompts):
            repeated += int(target in set(history_of[int(row_id)]))
            rec_rank = _position(ids, target)
            rerank_rank = _position(llm_ids, target)
            rec_ranks.append(rec_rank)
            rerank_ranks.append(rerank_rank)
            per_row[int(row_id)] = dict(catalogue_rec_rank=_json_rank(rec_rank),
                                        catalogue_rerank_rank=_json_rank(rerank_rank),
                                        catalogue_reranked=[int(i) for i in llm_ids[:5]],
                                        catalogue_history_dropped=prompt.num_history_dropped)
    rec_ranks, rerank_ranks = np.asarray(rec_ranks), np.asarray(rerank_ranks)
    metrics = dict(
        retrieve_k=int(k),
        catalogue_recall_at_k=float((rec_ranks < k).mean()),
        catalogue_rec_hit_ratio_at_10=float(ranking.hit_ratio(rec_ranks, CUTOFF).mean()),
        catalogue_rec_ndcg_at_10=float(ranking.ndcg(rec_ranks, CUTOFF).mean()),
        catalogue_rerank_hit_ratio_at_10=float(ranking.hit_ratio(rerank_ranks, CUTOFF).mean()),
        catalogue_rerank_ndcg_at_10=float(ranking.ndcg(rerank_ranks, CUTOFF).mean()),
        # Rows whose next item repeats one of their history: no recommendation can hit them.
        catalogue_target_in_history=repeated / max(len(rec_ranks), 1),
        catalogue_history_dropped_rows=sum(1 for r in per_row.values()
                                           if r["catalogue_history_dropped"]))
    return metrics, per_row


_MISS = np.iinfo(np.int64).max  # The rank of an item that is not in the list.


def _position(ids, item):
    found = np.flatnonzero(np.asarray(ids) == int(item))
    return int(found[0]) if len(found) else _MISS


def _json_rank(rank):
    return None if rank == _MISS else rank
