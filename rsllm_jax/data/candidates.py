"""Candidate sets: the target plus negatives drawn uniformly from the catalogue.

As in LLaRA: 19 negatives uniform over all items, excluding the history items and the target,
plus the target at a uniformly random position. Unlike LLaRA, every draw is a pure function of
integers (seed, split stream, epoch, row id): val/test candidates are fixed at prepare time,
and train candidates are redrawn per epoch, so a resumed run sees exactly the same sets, and
a row's candidates do not depend on which batch or host it lands in.

Random numbers come from a counter-based hash (SplitMix64) evaluated with NumPy on whole
batches: no per-row generator objects on the input pipeline's hot path.
"""

import numpy as np

NUM_CANDIDATES = 20
# Seed-stream tags so val, test and train draws never share a random stream.
SPLIT_STREAM = {"train": 0, "val": 1, "test": 2, "world": 3}

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x):
    """SplitMix64's finaliser on a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def stream_key(*seed_parts):
    """One uint64 key from a sequence of non-negative integers."""
    key = np.uint64(0)
    for part in seed_parts:
        key = _splitmix64(key ^ np.uint64(int(part)))
    return key


def random_uint64(keys, start, count):
    """(len(keys), count) hash values: draw number start..start+count-1 of each key's stream."""
    counters = np.arange(start, start + count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return _splitmix64(keys[:, None] ^ _splitmix64(counters * _GOLDEN)[None, :])


def excluded_items(catalogue, exclude_empty_titles):
    """Boolean mask of items never drawn as negatives: empty titles would match any answer."""
    excluded = np.zeros(catalogue.num_items, bool)
    if exclude_empty_titles:
        excluded[list(catalogue.empty_title_ids)] = True
    return excluded


def candidates_for_rows(history, history_len, target, row_id, num_items, seed_parts,
                        num_candidates=NUM_CANDIDATES, excluded=None):
    """(n, num_candidates) int32 candidate sets, one row per (history, target, row_id).

    Each set has distinct ids and exactly one copy of the target; negatives never come from the
    row's history (its first history_len entries), the target, or `excluded` (a boolean mask
    over items, e.g. items with empty titles). Row i depends only on (*seed_parts, row_id[i])
    and its own history and target.
    """
    history = np.asarray(history)
    target = np.asarray(target, np.int64)
    n = len(target)
    num_negatives = num_candidates - 1
    real = np.arange(history.shape[1])[None, :] < np.asarray(history_len)[:, None]
    own = np.where(real, history, -1)  # Padding never forbids anything.
    allowed = np.ones(num_items, bool) if excluded is None else ~np.asarray(excluded, bool)
    if int(allowed.sum()) - history.shape[1] - 1 < num_negatives:  # Tiny catalogue: check rows.
        for h, t in zip(own, target):
            left = allowed.copy()
            left[h[h >= 0]] = False
            left[t] = False
            if left.sum() < num_negatives:
                raise ValueError(f"a row with target {t} leaves only {left.sum()} items to draw "
                                 f"negatives from; {num_negatives} are needed")
    keys = _splitmix64(np.asarray(row_id, np.uint64) ^ stream_key(*seed_parts))
    negatives = np.full((n, num_negatives), -1, np.int64)
    filled = np.zeros(n, np.int64)
    block = 4 * num_candidates
    earlier = np.tril(np.ones((block, block), bool), -1)
    start, todo = 1, np.arange(n)  # Draw 0 of each stream places the target.
    while len(todo):
        draws = (random_uint64(keys[todo], start, block) % np.uint64(num_items)).astype(np.int64)
        ok = allowed[draws] & (draws != target[todo, None])
        ok &= ~(draws[:, :, None] == own[todo, None, :]).any(-1)
        # Skip repeats of an earlier draw of this block or of a negative kept before.
        ok &= ~((draws[:, :, None] == draws[:, None, :]) & earlier).any(-1)
        ok &= ~(draws[:, :, None] == negatives[todo, None, :]).any(-1)
        rank = np.cumsum(ok, axis=1)
        keep = ok & (rank <= (num_negatives - filled[todo])[:, None])
        k, j = np.nonzero(keep)
        negatives[todo[k], filled[todo[k]] + rank[k, j] - 1] = draws[k, j]
        filled[todo] += keep.sum(1)
        todo = todo[filled[todo] < num_negatives]
        start += block
    # The target goes to a uniformly random slot; negatives fill the others in draw order.
    slot = (random_uint64(keys, 0, 1)[:, 0] % np.uint64(num_candidates)).astype(np.int64)
    columns = np.arange(num_candidates)[None, :]
    source = np.clip(np.where(columns < slot[:, None], columns, columns - 1), 0, num_negatives - 1)
    out = np.take_along_axis(negatives, source, axis=1).astype(np.int32)
    out[np.arange(n), slot] = target
    return out
