"""Ranking metrics for one relevant item per row: HitRatio@k and NDCG@k.

A row's rank is the 0-based position of the true item when items are sorted by descending
score, ties broken by position (the earlier item first), exactly as `argmax` breaks them: so
HitRatio@1 is "argmax of the scores is the true item", the paper's HitRatio@1 for the
conventional recommenders (paper Table 2). With one relevant item the ideal DCG is 1, so
NDCG@k = 1 / log2(rank + 2) when rank < k, else 0.

A NaN score (a diverged model) never ranks above a number: a NaN true item ranks last
(rank = the number of columns, never a hit) and other NaN columns rank below it.
"""

import numpy as np


def ranks(scores, target_index):
    """0-based ranks (n,) of column `target_index[i]` within row i of `scores` (n, k)."""
    scores = np.asarray(scores)
    target_index = np.asarray(target_index)
    target_score = np.take_along_axis(scores, target_index[:, None], axis=1)
    earlier = np.arange(scores.shape[1])[None, :] < target_index[:, None]
    above = (scores > target_score) | ((scores == target_score) & earlier)
    # Comparisons with NaN are False: without this a NaN true item would rank first.
    above |= np.isnan(target_score)
    return above.sum(axis=1)


def hit_ratio(rank, k):
    """Per-row 1.0 if the true item is in the top k, else 0.0."""
    return (np.asarray(rank) < k).astype(np.float64)


def ndcg(rank, k):
    """Per-row NDCG@k for one relevant item."""
    rank = np.asarray(rank)
    return np.where(rank < k, 1.0 / np.log2(rank + 2.0), 0.0)


def candidate_target_index(candidates, target):
    """Column of each row's target within its candidate set; an error if it is missing."""
    candidates, target = np.asarray(candidates), np.asarray(target)
    found = candidates == target[:, None]
    missing = np.flatnonzero(~found.any(axis=1))
    if len(missing):
        raise ValueError(f"{len(missing)} rows (first: row {missing[0]}) do not have their "
                         "target among their candidates")
    return found.argmax(axis=1)


def recommendation_metrics(all_scores, candidates, target):
    """The rec step's metrics for rows with catalogue scores `all_scores` (n, num_items).

    On the row's 20 candidates: hit_ratio_at_1 (argmax is the true item), hit_ratio_at_5,
    ndcg_at_5, ndcg_at_10. On the whole catalogue (no item excluded, history included):
    full_hit_ratio_at_10, full_ndcg_at_10. Means over rows.
    """
    all_scores, candidates, target = map(np.asarray, (all_scores, candidates, target))
    candidate_scores = np.take_along_axis(all_scores, candidates.astype(np.int64), axis=1)
    on_candidates = ranks(candidate_scores, candidate_target_index(candidates, target))
    on_catalogue = ranks(all_scores, target)
    return dict(hit_ratio_at_1=float(hit_ratio(on_candidates, 1).mean()),
                hit_ratio_at_5=float(hit_ratio(on_candidates, 5).mean()),
                ndcg_at_5=float(ndcg(on_candidates,
                                     5).mean()), ndcg_at_10=float(ndcg(on_candidates, 10).mean()),
                full_hit_ratio_at_10=float(hit_ratio(on_catalogue, 10).mean()),
                full_ndcg_at_10=float(ndcg(on_catalogue, 10).mean()), num_rows=int(len(target)))
