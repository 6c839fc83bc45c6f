"""Candidate sets: the target plus negatives drawn uniformly from the catalogue.

As in LLaRA: 19 negatives uniform over all items, excluding the history items and the target,
plus the target at a uniformly random position. Optionally (config.data.distinct_candidate_titles)
no two candidates share a title: where items share titles, an answer's title then names one
candidate, which the answer rules and likelihood ranking need (evaluation/answers.py).

Unlike LLaRA, every draw is a pure function of integers (seed, split stream, epoch, row id):
val/test candidates are fixed at prepare time, and train candidates are redrawn per epoch, so a
resumed run sees exactly the same sets, and a row's candidates do not depend on which batch or
host it lands in.

Random numbers come from a counter-based hash (SplitMix64) evaluated with NumPy on whole
batches: no per-row generator objects on the input pipeline's hot path.
"""

import numpy as np

from rsllm_jax.data.titles import normalise

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


def title_groups(catalogue):
    """Item id → the index of its title, compared as the answer rules compare titles (case and
    whitespace folded): items with one index share a title."""
    index = {}
    return np.array([index.setdefault(normalise(t), len(index)) for t in catalogue.titles],
                    np.int64)


def draw_rules(catalogue, settings):
    """The keyword arguments of `candidates_for_rows` that a prepared dataset's settings (its
    manifest's) ask for: `excluded` and `title_group`."""
    return dict(
        excluded=excluded_items(catalogue, settings["exclude_empty_titles"]),
        title_group=title_groups(catalogue) if settings["distinct_candidate_titles"] else None)


def _check_enough_negatives(own, target, allowed, title_group, num_negatives):
    """Raises ValueError for the first row whose history leaves fewer than `num_negatives`
    items (or distinct titles, with `title_group`) to draw negatives from."""
    left = np.broadcast_to(allowed, (len(target), len(allowed))).copy()
    rows, columns = np.nonzero(own >= 0)
    left[rows, own[rows, columns]] = False
    left[np.arange(len(target)), target] = False
    if title_group is None:
        counts, what = left.sum(1), "items"
    else:
        has = np.zeros((len(target), int(title_group.max()) + 1), bool)
        rows, items = np.nonzero(left)
        has[rows, title_group[items]] = True
        has[np.arange(len(target)), title_group[target]] = False
        counts, what = has.sum(1), "items of distinct titles"
    short = np.flatnonzero(counts < num_negatives)
    if len(short):
        i = short[0]
        raise ValueError(f"a row with target {target[i]} leaves only {counts[i]} {what} to draw "
                         f"negatives from; {num_negatives} are needed")


def candidates_for_rows(history, history_len, target, row_id, num_items, seed_parts,
                        num_candidates=NUM_CANDIDATES, excluded=None, title_group=None):
    """(n, num_candidates) int32 candidate sets, one row per (history, target, row_id).

    Each set has distinct ids and exactly one copy of the target; negatives never come from the
    row's history (its first history_len entries), the target, or `excluded` (a boolean mask
    over items, e.g. items with empty titles). With `title_group` (item id → title index,
    `title_groups`) no two candidates share a title. Row i depends only on
    (*seed_parts, row_id[i]) and its own history and target.
    """
    history = np.asarray(history)
    target = np.asarray(target, np.int64)
    n = len(target)
    num_negatives = num_candidates - 1
    real = np.arange(history.shape[1])[None, :] < np.asarray(history_len)[:, None]
    own = np.where(real, history, -1)  # Padding never forbids anything.
    allowed = np.ones(num_items, bool) if excluded is None else ~np.asarray(excluded, bool)
    if title_group is not None:
        title_group = np.asarray(title_group, np.int64)
    # Each history entry and the target rule out at most one item (title), so only a small
    # catalogue (or few titles) might not fill a row: then check the rows, so that the draw
    # below cannot loop for ever. The row check is the cost of a whole draw; skipping it
    # otherwise keeps it off the per-batch path of training.
    supply = (int(allowed.sum()) if title_group is None else len(np.unique(title_group[allowed])))
    if supply - history.shape[1] - 1 < num_negatives:
        _check_enough_negatives(own, target, allowed, title_group, num_negatives)
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
        # Skip repeats of an earlier draw of this block or of a negative kept before: repeats
        # of the item, or with `title_group` of its title (and the target's title).
        if title_group is None:
            key, kept = draws, negatives[todo]
        else:
            key = title_group[draws]
            kept = np.where(negatives[todo] >= 0, title_group[negatives[todo]], -1)
            ok &= key != title_group[target[todo], None]
        ok &= ~((key[:, :, None] == key[:, None, :]) & earlier).any(-1)
        ok &= ~(key[:, :, None] == kept[:, None, :]).any(-1)
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
