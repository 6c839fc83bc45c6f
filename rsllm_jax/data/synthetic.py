"""A generated dataset with learnable sequential structure, for the demo and the tests.

Items belong to hidden "genres". A user's genre follows a sticky Markov chain; inside a genre
the next item is usually the successor of the previous one on the genre's ring, otherwise any
item of the genre. A model that learns the structure ranks the true item far above the 1/20
chance level. Titles are pronounceable, and on purpose some are substrings of others ("Tavo"
and "Tavo Lumen"), some carry punctuation, and some non-ASCII letters, like real catalogues.

Two options make it the situation the paper is about (an LLM that knows items from text but not
the dataset's item-to-item transitions, and a recommender that learnt those from interactions):
  genre_titles   every title starts with its genre's word ("Bexo Tavo Lumen"): titles carry the
                 genre, only interactions carry the transitions
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


def generate(seed=0, num_items=300, num_users=600, num_genres=10, min_length=6, max_length=30,
             domain="artists", genre_titles=False, world_users=0):
    """A catalogue and {train, val, test} SplitRows, split 8:1:1 by user like LLaRA's data,
    plus a "world" split with `world_users` > 0 (module docstring)."""
    rng = np.random.default_rng(seed)
    genre_of = None
    if genre_titles:  # Genres first (their own stream), then titles that carry them.
        genre_of = np.random.default_rng([seed, 1]).permutation(np.arange(num_items) % num_genres)
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
            genre_of = np.random.default_rng(seed)
            make_titles(genre_of, num_items)
            genre_of = genre_of.permutation(np.arange(num_items) % num_genres)
        world_rng = np.random.default_rng([seed, 2])
        world = make_sequences(world_rng, num_items, world_users, num_genres, min_length,
                               max_length, genre_of=genre_of, ring_order=world_rng)
        splits["world"] = rows_from_sequences(world, catalogue.pad_id)
    return catalogue, splits
