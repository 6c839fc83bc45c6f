"""The synthetic dataset: realistic titles and sequences a model can learn."""

import collections
import json

import numpy as np
import pytest

from rsllm_jax.data import synthetic
from rsllm_jax.data.candidates import candidates_for_rows


def test_titles_are_unique_and_have_the_hard_cases():
    titles = synthetic.make_titles(np.random.default_rng(0), 300)
    assert len(set(titles)) == 300 and all(t.strip() for t in titles)
    assert sum(a in b for a in titles for b in titles if a != b) >= 20  # substring pairs
    assert sum(any(ord(ch) > 127 for ch in t) for t in titles) >= 20
    assert sum(any(ch in "!?:.'&" for ch in t) for t in titles) >= 10


def test_deterministic_by_seed():
    a_catalogue, a = synthetic.generate(seed=1)
    b_catalogue, b = synthetic.generate(seed=1)
    assert a_catalogue == b_catalogue
    np.testing.assert_array_equal(a["train"].history, b["train"].history)
    _, c = synthetic.generate(seed=2)
    assert len(c["train"]) != len(a["train"]) or (c["train"].target != a["train"].target).any()


def test_splits_are_by_user_like_llara():
    catalogue, splits = synthetic.generate(num_users=200)
    assert [splits[s].num_sequences for s in ("train", "val", "test")] == [160, 20, 20]
    assert len(splits["val"]) == 20  # One row per val/test user.
    train = splits["train"]
    assert (train.history_len[train.sequence != np.roll(train.sequence, 1)] == 0).all()
    assert train.interactions == len(train)
    assert (train.history[train.history_len < 10] == catalogue.pad_id).any()


def test_a_successor_count_model_beats_chance_by_far():
    """Next-item structure is learnable: counting train transitions ranks test candidates."""
    catalogue, splits = synthetic.generate(seed=0)
    train = splits["train"]
    follows = collections.Counter()
    for history, length, target in zip(train.history, train.history_len, train.target):
        if length:
            follows[history[length - 1], target] += 1
    test = splits["test"]
    candidates = candidates_for_rows(test.history, test.history_len, test.target, test.row_id,
                                     catalogue.num_items, (0, 2))
    hits = 0
    for c, history, length, target in zip(candidates, test.history, test.history_len, test.target):
        scores = [follows[history[length - 1], item] for item in c]
        hits += c[int(np.argmax(scores))] == target
    assert hits / len(test) > 0.3  # Chance is 1/20.


def _successor_hits(train, test, catalogue):
    """HitRatio@1 on `test` of ranking candidates by how often they followed the last history
    item in `train`."""
    follows = collections.Counter()
    for history, length, target in zip(train.history, train.history_len, train.target):
        if length:
            follows[history[length - 1], target] += 1
    candidates = candidates_for_rows(test.history, test.history_len, test.target, test.row_id,
                                     catalogue.num_items, (0, 2))
    hits = [
        c[int(np.argmax([follows[h[n - 1], i] for i in c]))] == t
        for c, h, n, t in zip(candidates, test.history, test.history_len, test.target)
    ]
    return float(np.mean(hits))


def test_genre_titles_and_a_world_with_other_transitions():
    catalogue, splits = synthetic.generate(seed=0, num_items=120, num_users=600, num_genres=4,
                                           genre_titles=True, world_users=600)
    # Titles carry the genre: their first word. Items that follow each other in a sequence
    # mostly share it (users stay in a genre with probability 0.8).
    first = [t.split()[0] for t in catalogue.titles]
    assert len(set(first)) == 4
    train = splits["train"]
    has = train.history_len > 0
    last = train.history[has, train.history_len[has] - 1]
    same = np.mean([first[a] == first[b] for a, b in zip(last, train.target[has])])
    assert same > 0.75
    # The world split: same catalogue and genres (as sticky), other item-to-item transitions,
    # so what it teaches about the test users' next items is the genre, not the successor.
    world = splits["world"]
    assert world.num_sequences == 600 and world.interactions == len(world)
    has = world.history_len > 0
    last = world.history[has, world.history_len[has] - 1]
    assert np.mean([first[a] == first[b] for a, b in zip(last, world.target[has])]) > 0.75
    from_train = _successor_hits(train, splits["test"], catalogue)
    from_world = _successor_hits(world, splits["test"], catalogue)
    assert from_train > 0.3 and from_world < from_train - 0.15, (from_train, from_world)
    # Without the options the data are the default generator's, bit for bit.
    plain_catalogue, plain = synthetic.generate(seed=0, num_items=120, num_users=600, num_genres=4)
    again_catalogue, again = synthetic.generate(seed=0, num_items=120, num_users=600, num_genres=4,
                                                world_users=10)
    assert plain_catalogue == again_catalogue
    np.testing.assert_array_equal(plain["train"].target, again["train"].target)


def test_shared_titles_and_the_generator_structure():
    catalogue, splits = synthetic.generate(seed=3, num_items=90, num_users=600, num_genres=3,
                                           genre_titles=True, items_per_title=3)
    genre_of = synthetic.hidden_genres(3, 90, 3, genre_titles=True, items_per_title=3)
    sharing = collections.defaultdict(list)
    for item, title in enumerate(catalogue.titles):
        sharing[title].append(item)
    # 30 titles of 3 items each, the items of one title in one genre, named by its word.
    assert sorted(len(items) for items in sharing.values()) == [3] * 30
    assert all(len(set(genre_of[items])) == 1 for items in sharing.values())
    first = {
        g: {catalogue.titles[i].split()[0]
            for i in np.flatnonzero(genre_of == g)}
        for g in range(3)
    }
    assert all(len(words) == 1 for words in first.values())
    # Title groups are drawn at random, not along the rings: an item's ring successor seldom
    # shares its title.
    matrix = synthetic.transition_matrix(genre_of)
    successor = matrix.argmax(1)
    assert np.mean([catalogue.titles[i] == catalogue.titles[j]
                    for i, j in enumerate(successor)]) < 0.3
    # The transition matrix is the chain's: rows sum to 1, and its most likely successor is the
    # one the train split shows most often after each item, about half the time.
    np.testing.assert_allclose(matrix.sum(1), 1.0)
    train = splits["train"]
    has = train.history_len > 0
    last = train.history[has, train.history_len[has] - 1]
    counts = np.zeros((90, 90))
    np.add.at(counts, (last, train.target[has]), 1)
    assert (counts.argmax(1) == successor).mean() > 0.95
    assert abs(np.mean(successor[last] == train.target[has]) - 0.5) < 0.03
    # Sharing one title per item is the genre-titles world, bit for bit.
    a, a_splits = synthetic.generate(seed=3, num_items=90, num_genres=3, genre_titles=True)
    b, b_splits = synthetic.generate(seed=3, num_items=90, num_genres=3, genre_titles=True,
                                     items_per_title=1)
    assert a == b
    np.testing.assert_array_equal(a_splits["test"].target, b_splits["test"].target)


def test_hidden_genres_are_the_generators_without_options():
    catalogue, splits = synthetic.generate(seed=4, num_items=60, num_users=300, num_genres=3)
    genre_of = synthetic.hidden_genres(4, 60, 3)
    train = splits["train"]
    has = train.history_len > 0
    last = train.history[has, train.history_len[has] - 1]
    # Users stay in a genre with probability 0.8, and switch to a random one (maybe the same).
    assert np.mean(genre_of[last] == genre_of[train.target[has]]) > 0.8


def test_title_ceiling_sees_what_only_the_ids_carry(tmp_path):
    from benchmarks import title_ceiling
    from rsllm_jax.data import prepare as prepare_lib
    from rsllm_jax.data.storage import PreparedDataset

    settings = dict(seed=0, num_items=90, num_users=1000, num_genres=3, genre_titles=True)
    result = {}
    for sharing in (1, 3):
        out = tmp_path / str(sharing)
        prepare_lib.prepare("synthetic", "", str(out), distinct_candidate_titles=True,
                            synthetic=dict(settings, items_per_title=sharing))
        result[sharing] = title_ceiling.ceilings(PreparedDataset(str(out)), "test")
    unique, shared = result[1]["hit_ratio_at_1"], result[3]["hit_ratio_at_1"]
    # One title per item: the titles say what the ids say.
    assert unique["ids"] == pytest.approx(unique["titles"]) == pytest.approx(unique["last title"])
    # Three items per title: the titles lose the successor the ids know; reading the whole
    # history of titles gets part of it back.
    assert shared["ids"] > shared["titles"] + 0.05 > shared["last title"] + 0.1
    assert shared["ids"] > 0.4 and shared["last title"] > 5 * shared["chance"]
    assert result[3]["titles"] == 30 and result[3]["rows"] == 100

    # Which ceiling a model follows: a model ranking by the ids' scores follows the ids on
    # every row where the two ceilings disagree, one ranking by the titles' scores never does.
    dataset = PreparedDataset(str(tmp_path / "3"))
    rows, scores = title_ceiling.candidate_scores(dataset, "test")
    for name in ("ids", "titles"):
        path = tmp_path / f"{name}.jsonl"
        ranked = np.take_along_axis(rows["candidates"],
                                    np.argsort(-scores[name], axis=1, kind="stable"), axis=1)
        path.write_text("".join(
            json.dumps(dict(row_id=int(r), ranked=[int(i) for i in order])) + "\n"
            for r, order in zip(rows["row_id"], ranked)))
        [result] = title_ceiling.follows(dataset, "test", [str(path)])
        assert result["rows"] == 100 and result["disagreeing_rows"] > 10
        assert result["follows_ids"] == (1.0 if name == "ids" else 0.0)
        assert result["follows_titles"] == (1.0 if name == "titles" else 0.0)
    path.write_text(json.dumps(dict(row_id=10**6, ranked=[1])) + "\n")
    with pytest.raises(SystemExit, match="row_id 1000000 is not a test row"):
        title_ceiling.follows(dataset, "test", [str(path)])
