"""A generated dataset with learnable sequential structure, for the demo and the tests.

Items belong to hidden "genres". A user's genre follows a sticky Markov chain; inside a genre
the next item is usually the successor of the previous one on the genre's ring, otherwise any
item of the genre. A model that learns the structure ranks the true item far above the 1/20
chance level. Titles are pronounceable, and on purpose some are substrings of others ("Tavo"
and "Tavo Lumen"), some carry punctuation, and some non-ASCII letters, like real catalogues.

Three options make it the situation the paper is about (an LLM that knows items from text but not
the dataset's item-to-item transitions, and a recommender that learnt those from interactions):
  genre_titles   every title starts with its genre's word ("Bexo Tavo Lumen"): titles carry the
                 genre, only interactions carry the transitions
  items_per_title  that many items of one genre share each title, drawn at random (not ring
                 neighbours): a title names a group, only the ids (and the behavioural tokens
                 read from them) tell its items, and their successors, apart. Use it with
                 config.data.distinct_candidate_titles, so that an answer names one candidate
  world_users    a "world" split of that many more users over the same catalogue and genres
                 whose rings are ordered differently: text a base LLM can be pre-trained on
                 (config.pretrain.split) to learn the titles and genres, but not the
                 transitions of the train/val/test users
"""

import numpy as np

from rsllm_jax.data.catalogue import Catalogue
from rsllm_jax.data.sources import rows_from_sequences, split_users

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "ñ", "p", "r", "s", "t", "v", "z", "ch", "br",
           "st")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "é", "ö", "ü")
_SUFFIXES = ("Lumen", "Nights", "II", "Live", "& Friends", "Remix", "Reprise")
_PUNCTUATION = ("!", "?", ":", "'s", ".")


def _word(rng, syllables):
    parts = []
    for _ in range(syllables):
        parts.append(_ONSETS[rng.integers(len(_ONSETS))])
        # Mostly ASCII vowels; the last three entries are é, ö, ü.
        parts.append(_VOWELS[rng.integers(len(_VOWELS) - 3)] if rng.random() <
                     0.85 else _VOWELS[rng.integers(len(_VOWELS) - 3, len(_VOWELS))])
    return "".join(parts).capitalize()


def make_titles(rng, num_items):
    """Unique, non-empty titles; about 15 % extend an earlier title (substring pairs)."""
    titles, seen = [], set()
    while len(titles) < num_items:
        r = rng.random()
        if titles and r < 0.15:
            title = f"{titles[rng.integers(len(titles))]} {_SUFFIXES[rng.integers(len(_SUFFIXES))]}"
        else:
            words = [_word(rng, int(rng.integers(2, 4))) for _ in range(int(rng.integers(1, 3)))]
            title = " ".join(words)
            if r > 0.9:
                title += _PUNCTUATION[rng.integers(len(_PUNCTUATION))]
        if title not in seen:
            seen.add(title)
            titles.append(title)
    return titles


def make_genre_titles(rng, genre_of):
    """Unique titles that start with their genre's word (one pronounceable word per genre),
    with make_titles' hard cases in the rest of the title."""
    num_genres = int(genre_of.max()) + 1
    words = []
    while len(words) < num_genres:
        word = _word(rng, 2)
        if word not in words:
            words.append(word)
    rest = make_titles(rng, len(genre_of))
    return [f"{words[g]} {title}" for g, title in zip(genre_of, rest)]


def _rings(members, order=None):
    """Each item's position on its genre's ring; `order` permutes the rings (a world with other
    transitions)."""
    ring_position = np.empty(sum(len(m) for m in members), np.int64)
    for items in members:
        ring_position[items] = np.arange(len(items)) if order is None else \
            order.permutation(len(items))
    return ring_position


def hidden_genres(seed, num_items, num_genres, genre_titles=False, items_per_title=1):
    """The genre of every item, as `generate` draws it with these settings."""
    if genre_titles or items_per_title > 1:  # Drawn first, from their own stream.
        return np.random.default_rng([seed, 1]).permutation(np.arange(num_items) % num_genres)
    rng = np.random.default_rng(seed)  # make_sequences draws them after the titles.
    make_titles(rng, num_items)
    return rng.permutation(np.arange(num_items) % num_genres)


def transition_matrix(genre_of, stay_probability=0.8, successor_probability=0.6):
    """(num_items, num_items) P(next item | current item) of make_sequences' chain with rings in
    catalogue order, before its rule against repeating one of the last three items."""
    num_genres = int(genre_of.max()) + 1
    size = np.bincount(genre_of, minlength=num_genres)
    same = genre_of[:, None] == genre_of[None, :]
    matrix = (1 - stay_probability) / num_genres / size[genre_of][None, :] + np.where(
        same,
        stay_probability * (1 - successor_probability) / size[genre_of][:, None], 0.0)
    for g in range(num_genres):
        ring = np.flatnonzero(genre_of == g)
        matrix[ring, np.roll(ring, -1)] += stay_probability * successor_probability
    return matrix


def make_sequences(rng, num_items, num_users, num_genres, min_length, max_length,
                   stay_probability=0.8, successor_probability=0.6, genre_of=None, ring_order=None):
    """User item sequences from the hidden-genre Markov structure described above (genres
    drawn from `rng` unless given; rings in catalogue order unless `ring_order`, an rng)."""
    if genre_of is None:
        genre_of = rng.permutation(np.arange(num_items) % num_genres)
    members = [np.flatnonzero(genre_of == g) for g in range(num_genres)]
    ring_position = _rings(members, ring_order)
    ring_item = [items[np.argsort(ring_position[items])] for items in members]
    sequences = []
    for _ in range(num_users):
        length = int(rng.integers(min_length, max_length + 1))
        genre = int(rng.integers(num_genres))
        item = int(rng.choice(members[genre]))
        items = [item]
        while len(items) < length:
            if rng.random() > stay_probability:
                genre = int(rng.integers(num_genres))
                item = int(rng.choice(members[genre]))
            elif rng.random() < successor_probability:
                ring = ring_item[genre]
                item = int(ring[(ring_position[item] + 1) % len(ring)])
            else:
                item = int(rng.choice(members[genre]))
            if item not in items[-3:]:  # No immediate repeats, as in listening logs.
                items.append(item)
        sequences.append(items)
    return sequences


def title_groups_in_genres(rng, genre_of, items_per_title):
    """Item id → title index: the items of each genre, in a random order, in runs of
    `items_per_title` (the last run of a genre may be shorter); indices count genre by genre."""
    group = np.empty(len(genre_of), np.int64)
    count = 0
    for g in range(int(genre_of.max()) + 1):
        items = rng.permutation(np.flatnonzero(genre_of == g))
        runs = np.arange(len(items)) // items_per_title
        group[items] = count + runs
        count += int(runs[-1]) + 1 if len(items) else 0
    return group


def generate(seed=0, num_items=300, num_users=600, num_genres=10, min_length=6, max_length=30,
             domain="artists", genre_titles=False, items_per_title=1, world_users=0):
    """A catalogue and {train, val, test} SplitRows, split 8:1:1 by user like LLaRA's data,
    plus a "world" split with `world_users` > 0 (module docstring)."""
    if items_per_title < 1:
        raise ValueError(f"items_per_title must be at least 1, not {items_per_title}")
    rng = np.random.default_rng(seed)
    genre_of = None
    if genre_titles or items_per_title > 1:  # Genres first (their own stream), then titles.
        genre_of = hidden_genres(seed, num_items, num_genres, genre_titles, items_per_title)
    if items_per_title > 1:
        group = title_groups_in_genres(np.random.default_rng([seed, 3]), genre_of, items_per_title)
        group_genre = np.zeros(int(group.max()) + 1, np.int64)
        group_genre[group] = genre_of
        shared = (make_genre_titles(rng, group_genre) if genre_titles else make_titles(
            rng, len(group_genre)))
        titles = [shared[g] for g in group]
    elif genre_titles:
        titles = make_genre_titles(rng, genre_of)
    else:
        titles = make_titles(rng, num_items)
    catalogue = Catalogue(titles=tuple(titles), domain=domain)
    sequences = make_sequences(rng, num_items, num_users, num_genres, min_length, max_length,
                               genre_of=genre_of)
    train, val, test = split_users(range(num_users), seed)
    splits = {
        "train": rows_from_sequences([sequences[u] for u in train], catalogue.pad_id),
        "val": rows_from_sequences([sequences[u] for u in val], catalogue.pad_id, last_only=True),
        "test": rows_from_sequences([sequences[u] for u in test], catalogue.pad_id, last_only=True),
    }
    if world_users:
        if genre_of is None:  # The genres make_sequences drew from `rng` above.
            genre_of = hidden_genres(seed, num_items, num_genres)
        world_rng = np.random.default_rng([seed, 2])
        world = make_sequences(world_rng, num_items, world_users, num_genres, min_length,
                               max_length, genre_of=genre_of, ring_order=world_rng)
        splits["world"] = rows_from_sequences(world, catalogue.pad_id)
    return catalogue, splits
