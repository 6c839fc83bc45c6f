"""How well a predictor that knows the synthetic generator can do, from the ids or the titles.

  python benchmarks/title_ceiling.py --data DIR/shared/data [--split test] \
      [--predictions RUN/metrics/predictions_test.jsonl ...]

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

With --predictions (a run's per-row predictions on the same split), it also prints which
ceiling each model follows: on the rows where the `ids` and `titles` predictors pick different
candidates (each its highest-scored, the first on ties), the share on which the model's top
ranked candidate is the ids' pick and the share on which it is the titles'. A model that reads
the behavioural tokens follows the ids more often than one that reads only titles (README,
Results).
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


def candidate_scores(dataset, split):
    """(rows, scores): the split's rows and, per predictor, an array (rows, candidates) of its
    score for each stored candidate."""
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
    return rows, {name: np.array(s) for name, s in scores.items()}


def ceilings(dataset, split):
    """HitRatio@1 of each predictor (module docstring) on `split`, and the split's sizes."""
    rows, scores = candidate_scores(dataset, split)
    target_column = np.argmax(rows["candidates"] == rows["target"][:, None], axis=1)
    out = {name: float(expected_hit(s, target_column).mean()) for name, s in scores.items()}
    out["chance"] = 1.0 / rows["candidates"].shape[1]
    title_group = candidates_lib.title_groups(dataset.catalogue)
    return dict(split=split, rows=len(target_column), items=len(title_group),
                titles=int(title_group.max()) + 1, hit_ratio_at_1=out)


def follows(dataset, split, predictions_paths):
    """Per predictions file, which ceiling the model's top candidate agrees with, on the rows
    where the `ids` and `titles` predictors disagree (module docstring). The candidates are
    scored once for all files."""
    rows, scores = candidate_scores(dataset, split)
    picks = {
        name: rows["candidates"][np.arange(len(s)), np.argmax(s, axis=1)]
        for name, s in scores.items() if name in ("ids", "titles")
    }
    index = {int(row_id): i for i, row_id in enumerate(rows["row_id"])}
    return [_follows_one(dataset, split, path, picks, index) for path in predictions_paths]


def _follows_one(dataset, split, predictions_path, picks, index):
    top = {}
    with open(predictions_path) as f:
        for line_number, line in enumerate(f, 1):
            record = json.loads(line)
            if not record.get("ranked"):
                raise SystemExit(f"{predictions_path}:{line_number}: no ranked candidates")
            top[record["row_id"]] = record["ranked"][0]
    unknown = sorted(set(top) - set(index))
    if unknown:
        raise SystemExit(f"{predictions_path}: row_id {unknown[0]} is not a {split} row of "
                         f"{dataset.data_dir}")
    disagree = [
        row_id for row_id in top if picks["ids"][index[row_id]] != picks["titles"][index[row_id]]
    ]
    share = lambda name: float(  # noqa: E731
        np.mean([top[r] == picks[name][index[r]] for r in disagree])) if disagree else None
    return dict(predictions=predictions_path, rows=len(top), disagreeing_rows=len(disagree),
                follows_ids=share("ids"), follows_titles=share("titles"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="a prepared synthetic data folder")
    parser.add_argument("--split", default="test")
    parser.add_argument("--predictions", nargs="*", default=[],
                        help="runs' metrics/predictions_<split>.jsonl on the same data")
    args = parser.parse_args()
    dataset = PreparedDataset(args.data)
    print(json.dumps(ceilings(dataset, args.split), indent=1))
    for result in follows(dataset, args.split, args.predictions):
        print(json.dumps(result))


if __name__ == "__main__":
    main()
