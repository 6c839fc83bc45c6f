"""Readers for LLaRA-format splits and raw MovieLens ratings, with row validation.

A split is held as `SplitRows`: parallel NumPy arrays, one entry per row, histories oldest
first and right-padded with the catalogue's pad id (= number of items), as in LLaRA's files.
Every problem is a DataError naming the file, the row and what is wrong.
"""

import collections
import dataclasses
import os

import numpy as np

from rsllm_jax.data.errors import DataError
from rsllm_jax.data.safe_pickle import load_dataframe

MAX_HISTORY = 10  # LLaRA's window; every dataset here uses it.
LLARA_COLUMNS = ("seq", "len_seq", "next")


@dataclasses.dataclass
class SplitRows:
    """One split's rows as parallel arrays (length n)."""

    history: np.ndarray  # (n, MAX_HISTORY) int32, right-padded with the pad id.
    history_len: np.ndarray  # (n,) int32, number of real items in `history`.
    target: np.ndarray  # (n,) int32, the next item.
    row_id: np.ndarray  # (n,) int64, position in the source: stable across runs.
    sequence: np.ndarray  # (n,) int32, index of the user sequence the row comes from.
    # MovieLens only: ratings beside the items, used to match LLaRA's rows to raw users.
    history_rating: np.ndarray = None
    target_rating: np.ndarray = None
    # Interactions of the split's users when known in full (raw data); else None.
    interactions: int = None

    def __len__(self):
        return len(self.target)

    def select(self, keep):
        """The rows where the boolean mask `keep` is true."""
        arrays = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), np.ndarray)
        }
        return dataclasses.replace(self, **{k: v[keep] for k, v in arrays.items()})

    @property
    def num_sequences(self):
        return len(np.unique(self.sequence))


def _item_and_rating(value):
    """LLaRA stores plain ids (LastFM, Steam) or (id, rating) pairs (MovieLens)."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return value[0], value[1]
    return value, None


def _as_int(value, path, row, field):
    """An integer cell; integral floats are accepted (a missing value turns a pandas column to
    float64), NaN and anything else is an error naming the row."""
    if isinstance(value, (float, np.floating)):
        if np.isnan(value):
            raise DataError(path, f"{field} is missing (NaN)", row=row)
        if np.isfinite(value) and float(value).is_integer():
            return int(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise DataError(path, f"{field} {value!r} is not an integer", row=row)
    return int(value)


def _as_item_id(value, num_items, allow_pad, path, row, field):
    """Validates one id; the pad id is num_items."""
    value = _as_int(value, path, row, f"{field}: item id")
    if value < 0:
        raise DataError(path, f"{field}: negative item id {value}", row=row)
    if value == num_items and allow_pad:
        return value
    if value >= num_items:
        raise DataError(
            path, f"{field}: item id {value} has no title (the catalogue has ids "
            f"0..{num_items - 1}; {num_items} is padding)", row=row)
    return value


def _padding_id(frame):
    """The id a split pads histories with: the last `seq` entry of its first row with fewer
    than MAX_HISTORY items; None when no row shows one (malformed rows are reported later)."""
    for seq, len_seq in zip(frame["seq"], frame["len_seq"]):
        try:
            padded = len(seq) == MAX_HISTORY and int(len_seq) < MAX_HISTORY
        except (TypeError, ValueError):
            return None
        if padded:
            item, _ = _item_and_rating(seq[-1])
            integer = isinstance(item, (int, np.integer)) and not isinstance(item, bool)
            return int(item) if integer else None
    return None


def _check_padding(frame, path, num_items, catalogue_file):
    """LLaRA pads with the number of items: another pad id means the title file and the split
    disagree on the catalogue, which the title file's author should hear about first."""
    pad = _padding_id(frame)
    if pad is None or pad == num_items:
        return
    mismatch = (f"has {num_items - pad} more item(s) (ids {pad}..{num_items - 1})"
                if pad < num_items else f"lacks ids {num_items}..{pad - 1}")
    raise DataError(
        catalogue_file or path, f"lists {num_items} items, but "
        f"{os.path.basename(path)} pads histories with id {pad} (LLaRA pads with the "
        f"number of items): the title file {mismatch} or the split belongs to "
        "another dataset")


def read_llara_split(path, num_items, infer_sequences=False, catalogue_file=None):
    """Reads one LLaRA split (`train_data.df`, `Val_data.df`, `Test_data.df`).

    Args:
      path: the pandas pickle (read through the restricted unpickler).
      num_items: catalogue size; ids must lie in [0, num_items), num_items is padding.
      infer_sequences: train files hold every prefix of each user's history in order; when set,
        rows that extend the previous row's history by its target are given the same sequence
        index. Otherwise every row is its own sequence (val/test: one row per user).
      catalogue_file: the title file the catalogue came from, named when the split pads with
        another id than num_items.
    """
    frame = load_dataframe(path)
    missing = [c for c in LLARA_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(path, f"missing column(s) {missing}; found {list(frame.columns)}")
    _check_padding(frame, path, num_items, catalogue_file)
    n = len(frame)
    pad = num_items
    history = np.full((n, MAX_HISTORY), pad, np.int32)
    history_len = np.zeros(n, np.int32)
    target = np.zeros(n, np.int32)
    history_rating = np.zeros((n, MAX_HISTORY), np.int8)
    target_rating = np.zeros(n, np.int8)
    has_ratings = False
    for i, (seq, len_seq, nxt) in enumerate(zip(frame["seq"], frame["len_seq"], frame["next"])):
        row = f"row {i}"
        if not hasattr(seq, "__len__"):
            raise DataError(path, f"seq: expected a list of item ids, found {seq!r}", row=row)
        if len(seq) > MAX_HISTORY:
            raise DataError(path, f"seq: history has {len(seq)} entries, more than {MAX_HISTORY}",
                            row=row)
        count = 0
        for j, entry in enumerate(seq):
            item, rating = _item_and_rating(entry)
            item = _as_item_id(item, num_items, True, path, row, "seq")
            if item == pad:
                continue
            if count != j:
                raise DataError(path, "seq: item after padding (histories are right-padded)",
                                row=row)
            history[i, count] = item
            if rating is not None:
                history_rating[i, count] = _as_int(rating, path, row, "seq: rating")
                has_ratings = True
            count += 1
        item, rating = _item_and_rating(nxt)
        target[i] = _as_item_id(item, num_items, False, path, row, "next")
        if rating is not None:
            target_rating[i] = _as_int(rating, path, row, "next: rating")
        history_len[i] = count
        # LLaRA writes len_seq = 1 for an empty history too.
        length = _as_int(len_seq, path, row, "len_seq")
        if length != count and not (count == 0 and length == 1):
            raise DataError(path, f"len_seq is {length} but seq holds {count} items", row=row)
    sequence = (_infer_sequences(history, history_len, target) if infer_sequences else np.arange(
        n, dtype=np.int32))
    return SplitRows(history=history, history_len=history_len, target=target,
                     row_id=np.arange(n, dtype=np.int64), sequence=sequence,
                     history_rating=history_rating if has_ratings else None,
                     target_rating=target_rating if has_ratings else None)


def _infer_sequences(history, history_len, target):
    """Sequence index per row: a row continues the previous one iff its history is the previous
    history followed by the previous target (windowed to MAX_HISTORY)."""
    sequence = np.zeros(len(target), np.int32)
    for i in range(1, len(target)):
        previous = list(history[i - 1, :history_len[i - 1]]) + [target[i - 1]]
        current = list(history[i, :history_len[i]])
        continues = current == previous[-MAX_HISTORY:] and history_len[i] > 0
        sequence[i] = sequence[i - 1] + (0 if continues else 1)
    return sequence


def drop_short_histories(rows, min_history):
    """LLaRA drops rows with fewer than `min_history` history items (its `len_seq < 3`)."""
    keep = rows.history_len >= min_history
    return rows.select(keep), int((~keep).sum())


def read_movielens_ratings(path, num_items, min_rating=3):
    """Reads MovieLens-100K `u.data` (user, item, rating, timestamp; tab-separated).

    Returns {user_id: [(item_id, rating), ...]} with ids 0-based, ratings >= min_rating only,
    ordered by timestamp; same-timestamp ties keep the file's order (LLaRA's own tie order is
    not recoverable, so rebuilt rows are close to, not identical with, LLaRA's).
    """
    try:
        raw = np.loadtxt(path, dtype=np.int64, ndmin=2)
    except (OSError, ValueError) as e:
        raise DataError(path, f"cannot read ratings ({e})") from e
    if raw.shape[1] != 4:
        raise DataError(path,
                        f"expected 4 columns (user item rating timestamp), found {raw.shape[1]}")
    for column, name in ((0, "user id"), (1, "item id")):
        bad = np.flatnonzero(raw[:, column] < 1)
        if len(bad):
            raise DataError(path, f"{name} {raw[bad[0], column]} must be >= 1",
                            row=f"line {bad[0] + 1}")
    bad = np.flatnonzero(raw[:, 1] > num_items)
    if len(bad):
        raise DataError(path, f"item id {raw[bad[0], 1]} has no title in u.item "
                        f"({num_items} movies)", row=f"line {bad[0] + 1}")
    raw = raw[raw[:, 2] >= min_rating]
    order = np.lexsort((np.arange(len(raw)), raw[:, 3], raw[:, 0]))
    sequences = collections.defaultdict(list)
    for user, item, rating, _ in raw[order]:
        sequences[int(user) - 1].append((int(item) - 1, int(rating)))
    return dict(sequences)


def rows_from_sequences(sequences, pad_id, last_only=False):
    """Rows from ordered item sequences, as LLaRA builds them.

    `last_only=False` (train): every prefix is a row, the item at position t the target and
    the up to MAX_HISTORY items before it the history (the first row has an empty history).
    `last_only=True` (val/test): one row per sequence, its last item the target.
    """
    histories, lengths, targets, seq_index = [], [], [], []
    for s, items in enumerate(sequences):
        for t in (range(len(items) - 1, len(items)) if last_only else range(len(items))):
            window = list(items[max(0, t - MAX_HISTORY):t])
            histories.append(window + [pad_id] * (MAX_HISTORY - len(window)))
            lengths.append(len(window))
            targets.append(items[t])
            seq_index.append(s)
    n = len(targets)
    return SplitRows(history=np.asarray(histories, np.int32).reshape(n, MAX_HISTORY),
                     history_len=np.asarray(lengths,
                                            np.int32), target=np.asarray(targets, np.int32),
                     row_id=np.arange(n, dtype=np.int64), sequence=np.asarray(seq_index, np.int32),
                     interactions=sum(len(items) for items in sequences))


def match_rows_to_users(rows, user_sequences, path):
    """For each LLaRA MovieLens val/test row, the one raw user whose (item, rating) pairs
    contain the row's history and target. No match or several matches is an error."""
    if rows.history_rating is None:
        raise DataError(path, "MovieLens rows must hold (item, rating) pairs to be matched")
    user_pairs = {u: set(s) for u, s in user_sequences.items()}
    users = []
    for i in range(len(rows)):
        n = rows.history_len[i]
        want = set(zip(rows.history[i, :n].tolist(), rows.history_rating[i, :n].tolist()))
        want.add((int(rows.target[i]), int(rows.target_rating[i])))
        found = [u for u, pairs in user_pairs.items() if want <= pairs]
        if len(found) != 1:
            raise DataError(path, f"matches {len(found)} users of u.data, expected exactly one",
                            row=f"row {i}")
        users.append(found[0])
    return users


def split_users(user_ids, seed, fractions=(0.8, 0.1, 0.1)):
    """Seeded user split (LLaRA's 8:1:1) → (train, val, test) lists of user ids."""
    users = np.array(sorted(user_ids))
    np.random.default_rng(seed).shuffle(users)
    n_val, n_test = (max(1, int(round(f * len(users)))) for f in fractions[1:])
    n_train = len(users) - n_val - n_test
    if n_train < 1:
        raise ValueError(f"{len(users)} users are too few for a train/val/test split")
    return (sorted(users[:n_train].tolist()), sorted(users[n_train:n_train + n_val].tolist()),
            sorted(users[n_train + n_val:].tolist()))


def find_file(source, names):
    """The first of `names` found in `source` or its `llara/`, `ml-100k/` subfolders."""
    for sub in ("", "llara", "ml-100k"):
        for name in names:
            candidate = os.path.join(source, sub, name)
            if os.path.isfile(candidate):
                return candidate
    return None


def require_file(source, names, what):
    path = find_file(source, names)
    if path is None:
        raise DataError(
            source, f"source folder has no {what} (looked for {', '.join(names)} "
            "here and in its llara/ and ml-100k/ subfolders)")
    return path
