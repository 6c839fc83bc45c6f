"""How well a predictor that knows the synthetic generator can do, from the ids or the titles.

  python benchmarks/title_ceiling.py --data DIR/shared/data [--split test]

On a prepared synthetic dataset (data/synthetic.py), scores each row's stored candidates with
the generator's own next-item probabilities (synthetic.transition_matrix; the rule against
repeating one of the last three items applied by zeroing them) and prints HitRatio@1 of:

  ids           P(next = candidate | the history's last item): what the recommender, and an LLM
                reading its behavioural tokens, can at best reach
  titles        the candidate's title scored by P(next has that title | the history's titles),
                the history's items filtered forward through the chain from their titles
                alone: the best an LLM reading only titles can do
  last title    the same from the last history title alone, the shortcut of a model that does
                not disambiguate a title by the items before it
  chance        1 / the number of candidates

Ties count as the expected hit of a uniform pick among the tied candidates. With unique titles
(items_per_title 1) `ids` and `titles` coincide; the gap between them is the information that
only the ids carry. The chain ignores the repeat rule's effect on the hidden state, so the
figures are close estimates, not exact optima.
"""

import argparse
import json

import numpy as np

from rsllm_jax.data import candidates as candidates_lib, synthetic
from rsllm_jax.data.storage import PreparedDataset


def expected_hit(scores, target_column):
    """Per row: 1/k when the target's score ties k candidates at the maximum, else 0."""
    best = scores.max(1, keepdims=True)
    top = np.isclose(scores, best, rtol=1e-9, atol=0)
    return np.where(top[np.arange(len(scores)), target_column], 1.0 / top.sum(1), 0.0)


def title_filter(titles, transition, title_group):
    """(steps, items): P(item at step t | the titles of steps 0..t), forward through the chain
    from a uniform start."""
    emission = title_group[None, :] == np.asarray(titles)[:, None]
    beliefs = [emission[0] / emission[0].sum()]
    for seen in emission[1:]:
        belief = (beliefs[-1] @ transition) * seen
        beliefs.append(belief / belief.sum())
    return np.array(beliefs)


def next_item_from_titles(titles, transition, title_group):
    """P(next item | history titles): the last step's belief through the chain, times the
    probability that the item is none of the last three (which the generator never repeats),
    judged from the titles."""
    beliefs = title_filter(titles, transition, title_group)
    return (beliefs[-1] @ transition) * np.prod(1.0 - beliefs[-3:], axis=0)


def ceilings(dataset, split):
    settings = dataset.manifest["settings"]
    generator = settings["synthetic"]
    if dataset.name != "synthetic":
        raise SystemExit(f"{dataset.data_dir} holds {dataset.name}, not the synthetic dataset")
    genre_of = synthetic.hidden_genres(generator["seed"], generator["num_items"],
                                       generator["num_genres"], generator["genre_titles"],
                                       generator["items_per_title"])
    transition = synthetic.transition_matrix(genre_of)
    title_group = candidates_lib.title_groups(dataset.catalogue)
    rows = dataset.read(split)
    num_titles = int(title_group.max()) + 1
    by_title = np.zeros((num_titles, len(genre_of)))
    by_title[title_group, np.arange(len(genre_of))] = 1.0
    scores = {"ids": [], "titles": [], "last title": []}
    for history, length, cands in zip(rows["history"], rows["history_len"], rows["candidates"]):
        items = history[:length]
        next_ids = transition[items[-1]].copy()
        next_ids[items[-3:]] = 0.0  # The generator never repeats one of the last three.
        scores["ids"].append(next_ids[cands])
        # A candidate's title stands for every item with that title.
        for name, seen in (("titles", items), ("last title", items[-1:])):
            p = next_item_from_titles(title_group[seen], transition, title_group)
            scores[name].append((by_title @ p)[title_group[cands]])
    target_column = np.argmax(rows["candidates"] == rows["target"][:, None], axis=1)
    out = {
        name: float(expected_hit(np.array(s), target_column).mean())
        for name, s in scores.items()
    }
    out["chance"] = 1.0 / rows["candidates"].shape[1]
    return dict(split=split, rows=len(target_column), items=len(genre_of), titles=num_titles,
                hit_ratio_at_1=out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="a prepared synthetic data folder")
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    result = ceilings(PreparedDataset(args.data), args.split)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
