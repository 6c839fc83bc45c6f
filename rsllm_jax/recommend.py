"""Recommendations from a trained run, for one user or many.

  python -m rsllm_jax.recommend --workdir runs/lastfm --history "Madonna | Björk | Moby"
  python -m rsllm_jax.recommend --workdir runs/lastfm --history_ids 12,40,7 --top 5 --json
  python -m rsllm_jax.recommend --workdir runs/lastfm --input users.jsonl --output recs.jsonl
  python -m rsllm_jax.recommend --workdir runs/lastfm --history "Madonna" --candidates "A | B"

By default the run's recommender scores the whole catalogue, the history's items excluded, and
its top `--retrieve` (K, 50) items are re-ranked by the LLM: the prompt lists them as its
candidates and each title's likelihood given the prompt orders them, as the eval step ranks
its candidates (evaluation/catalogue_ranking.py). `--candidates` ranks the items given
instead; `--recommender_only` skips the LLM. Titles resolve exactly, then ignoring case and
spaces; an unknown or ambiguous title is an error naming the closest titles
(data/titles.py). Histories longer than the prompts' (10 items) keep their last items.

`--input` reads JSON lines {"history": [...], "candidates": [...], "id": ...} ("candidates" and
"id" optional; an item is a title (string) or an id (integer)); `--output` gets one JSON line
per input line, in order: {"id", "history", "history_dropped", "recommendations": [{"rank",
"item_id", "title", "score", "recommender_score"}]}. `score` is the LLM's log-likelihood of the
title (or the recommender's score with `--recommender_only`).

The Python API is the same: `Recommender.from_workdir(W).recommend(["Madonna", 12], top=10)`.
"""

import argparse
import dataclasses
import json
import sys

import numpy as np

from rsllm_jax import compilation_cache, config_lists, run_folder, run_paths
from rsllm_jax.data.candidates import excluded_items
from rsllm_jax.data.storage import PreparedDataset
from rsllm_jax.data.titles import TitleIndex, UnknownItemError
from rsllm_jax.evaluation import catalogue_ranking
from rsllm_jax.prompts.encoding import PromptTooLongError

DEFAULT_RETRIEVE = 50


@dataclasses.dataclass
class Recommendation:
    """One user's ranked items."""

    history: list  # The item ids the recommendation is for (at most the prompts' 10).
    items: list  # Dicts: rank, item_id, title, score, recommender_score (None: no recommender).
    history_dropped: int  # Oldest history items the prompt had no room for.
    num_candidates: int  # Items ranked (K retrieved, or the candidates given).

    def to_json(self, key=None):
        out = dict(history=self.history, history_dropped=self.history_dropped,
                   num_candidates=self.num_candidates, recommendations=self.items)
        return out if key is None else dict(id=key, **out)


class Recommender:
    """A trained run, ready to recommend: the LLM of one stage and the run's recommender."""

    def __init__(self, evaluator, dataset, stage, recommender=None,
                 pairs_per_call=catalogue_ranking.PAIRS_PER_CALL):
        """`evaluator`: an `evaluation.evaluate.Evaluator` of the stage; `recommender`:
        (model, params) of the run's recommender, or None (then candidates must be given)."""
        self.evaluator = evaluator
        self.dataset = dataset
        self.stage = stage
        self.catalogue = dataset.catalogue
        self.titles = TitleIndex(self.catalogue)
        self.max_history = dataset.manifest["max_history"]
        self.pairs_per_call = pairs_per_call
        self.excluded = np.flatnonzero(
            excluded_items(self.catalogue, dataset.manifest["settings"]["exclude_empty_titles"]))
        # (padded histories, lengths) → the recommender's scores of every item; None without one.
        self.score_items = None
        if recommender is not None:
            from rsllm_jax.recommenders import train

            model, params = recommender
            score_fn = train.make_score_fn(model)
            self.score_items = lambda history, length: np.asarray(score_fn(params, history, length))

    @classmethod
    def from_workdir(cls, workdir, stage=run_folder.AUTO, max_length=None, mesh="",
                     pairs_per_call=catalogue_ranking.PAIRS_PER_CALL):
        """The Recommender of `stage` (default: the last finished) of the run in `workdir`.
        `max_length` raises the prompts' token limit (for large K); `mesh` overrides the
        run's device mesh."""
        from rsllm_jax.evaluation.evaluate import Evaluator
        from rsllm_jax.recommenders import saved

        stage = run_folder.resolve_stage(workdir, stage)
        config = run_folder.set_mesh(run_folder.load_config(workdir, stage), mesh)
        config.eval.item_format = config[stage].item_format
        if max_length:
            config.prompts.max_length = int(max_length)
            buckets = list(
                config_lists.ints(config.prompts.length_buckets, "config.prompts.length_buckets"))
            while max(buckets) < max_length:  # Steps of 1.5×, as the default buckets grow.
                buckets.append(min(-(-max(buckets) * 3 // 2 // 128) * 128, int(max_length)))
            config.prompts.length_buckets = ",".join(map(str, buckets))
        dataset = PreparedDataset(run_paths.data_dir(config, workdir))
        num_items = dataset.catalogue.num_items
        table_path = run_paths.item_table_path(config, workdir)
        try:
            model, params, _ = saved.load_recommender(config, workdir, num_items, table_path)
            recommender = (model, params)
        except FileNotFoundError:  # No rec step: only given candidates can be ranked.
            recommender = None
        evaluator = Evaluator.from_workdir(config, workdir, dataset, stage)
        return cls(evaluator, dataset, stage, recommender, pairs_per_call)

    @property
    def has_recommender(self):
        return self.score_items is not None

    # --- input ------------------------------------------------------------------------------

    def item_ids(self, items, unique=False):
        """Ids of `items` (titles or ids); with `unique`, repeats dropped (the first kept)."""
        ids = [self.titles.item_id(item) for item in items]
        return list(dict.fromkeys(ids)) if unique else ids

    def padded_histories(self, histories):
        """(history ids padded to max_history, lengths), as the recommender reads them."""
        pad = self.catalogue.pad_id
        history = np.full((len(histories), self.max_history), pad, np.int32)
        for i, ids in enumerate(histories):
            history[i, :len(ids)] = ids
        return history, np.asarray([len(h) for h in histories], np.int32)

    def recommender_scores(self, histories):
        """The recommender's scores (n, num_items) of every item for each history (ids)."""
        if not self.has_recommender:
            raise ValueError("this run has no trained recommender (no rec step): give the "
                             "candidates to rank")
        return self.score_items(*self.padded_histories(histories))

    # --- recommending -----------------------------------------------------------------------

    def recommend(self, history, top=10, candidates=None, retrieve=DEFAULT_RETRIEVE, rerank=True):
        """The `top` items for one history (titles or ids, oldest first); a Recommendation."""
        return self.recommend_many([dict(history=history, candidates=candidates)], top, retrieve,
                                   rerank)[0]

    def recommend_many(self, requests, top=10, retrieve=DEFAULT_RETRIEVE, rerank=True,
                       batch_size=8):
        """Recommendations for many users: `requests` are dicts with "history" and, optionally,
        "candidates" (titles or ids). Prompts are run `batch_size` at a time."""
        if top < 1 or retrieve < 1:
            raise ValueError(f"top={top} and retrieve={retrieve} must be at least 1")
        parsed = [self._parse(request, i) for i, request in enumerate(requests)]
        out = []
        for start in range(0, len(parsed), batch_size):
            out += self._batch(parsed[start:start + batch_size], start, top, retrieve, rerank)
        return out

    def _parse(self, request, index):
        try:
            history = self.item_ids(request.get("history") or [])
            if not history:
                raise UnknownItemError("the history is empty")
            given = request.get("candidates")
            candidates = self.item_ids(given, unique=True) if given else None
        except UnknownItemError as e:
            raise UnknownItemError(f"user {index}: {e}") from None
        if candidates is None and not self.has_recommender:
            raise ValueError(f"user {index}: no candidates given and this run has no trained "
                             "recommender to retrieve them (no rec step)")
        return history[-self.max_history:], candidates

    def _batch(self, parsed, offset, top, retrieve, rerank):
        histories = [history for history, _ in parsed]
        scores = self.recommender_scores(histories) if self.has_recommender else None
        # Without the LLM the recommender ranks the whole catalogue.
        k = retrieve if rerank else self.catalogue.num_items
        retrieved = catalogue_ranking.retrieve(scores, histories, k, self.excluded) \
            if scores is not None else [None] * len(parsed)
        lists = [
            np.asarray(given if given is not None else found[0])
            for (_, given), found in zip(parsed, retrieved)
        ]
        for i, ids in enumerate(lists):
            if not len(ids):  # A history that holds every item of the catalogue.
                raise ValueError(f"user {offset + i}: no item outside the history to rank")
        dropped = [0] * len(parsed)
        if rerank:
            try:
                ranked, prompts = catalogue_ranking.rerank(self.evaluator, histories, lists,
                                                           [given is None for _, given in parsed],
                                                           range(offset, offset + len(parsed)),
                                                           self.pairs_per_call)
            except PromptTooLongError as e:
                raise PromptTooLongError(  # The encoder names the row: here, the user.
                    f"{str(e).replace('row ', 'user ', 1)}; rank fewer candidates (--retrieve) "
                    "or raise --max_length") from None
            dropped = [p.num_history_dropped for p in prompts]
        else:
            if scores is None:
                raise ValueError("ranking without the LLM needs the run's recommender")
            ranked = []
            for row, ids in zip(scores, lists):
                order = np.argsort(-row[ids], kind="stable")
                ranked.append((ids[order], row[ids][order]))
        out = []
        for i, (ids, values) in enumerate(ranked):
            items = [
                dict(rank=rank + 1, item_id=int(item), title=self.catalogue.title(int(item)),
                     score=float(value),
                     recommender_score=None if scores is None else float(scores[i][int(item)]))
                for rank, (item, value) in enumerate(zip(ids[:top], values[:top]))
            ]
            out.append(
                Recommendation([int(h) for h in histories[i]], items, dropped[i], len(lists[i])))
        return out


# --- command line ---------------------------------------------------------------------------


def _split(text):
    return [part.strip() for part in text.split("|") if part.strip()]


def _ids(text):
    try:
        return list(config_lists.ints(text, "item ids"))
    except ValueError:
        raise UnknownItemError(f"{text!r}: expected comma-separated item ids") from None


def _read_requests(path):
    requests, keys = [], []
    stream = sys.stdin if path == "-" else open(path, encoding="utf-8")
    with stream:
        for line_no, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                request = json.loads(line)
                if not isinstance(request, dict) or not isinstance(request.get("history"), list):
                    raise ValueError('expected an object with a "history" list')
            except ValueError as e:
                raise ValueError(f"{path} line {line_no}: {e}") from None
            requests.append(request)
            keys.append(request.get("id", line_no))
    return requests, keys


def _print_text(recommendation, recommender, rerank, given):
    titles = " | ".join(recommender.catalogue.title(i) for i in recommendation.history)
    if given:
        source = f"{recommendation.num_candidates} candidates given"
    elif rerank:
        source = f"the recommender's top {recommendation.num_candidates} of the catalogue"
    else:
        source = f"the whole catalogue ({recommendation.num_candidates} items not in the history)"
    how = "ranked by the LLM's likelihood" if rerank else "ranked by the recommender"
    print(f"History: {titles}")
    print(f"({recommender.stage}, {recommender.evaluator.item_format} prompts; {source}, {how}" +
          (f"; {recommendation.history_dropped} oldest history items left out of the prompt"
           if recommendation.history_dropped else "") + ")")
    for item in recommendation.items:
        extra = "" if item["recommender_score"] is None or not rerank else \
            f"  (recommender {item['recommender_score']:.3f})"
        print(f"{item['rank']:3d}. {item['title']}  [id {item['item_id']}]  "
              f"score {item['score']:.3f}{extra}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="the run folder (rsllm_jax.main's)")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--history", help='titles, oldest first, separated by "|"')
    who.add_argument("--history_ids", help="item ids, oldest first, separated by commas")
    who.add_argument("--input", help='JSON lines of {"history": [...]} ("-": stdin)')
    parser.add_argument("--output", help="JSON lines out (with --input; default stdout)")
    parser.add_argument("--candidates", help='rank these titles ("|"-separated) instead')
    parser.add_argument("--candidate_ids", help="rank these ids (comma-separated) instead")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--retrieve", type=int, default=DEFAULT_RETRIEVE,
                        help="K: items the recommender retrieves for the LLM to re-rank")
    parser.add_argument("--recommender_only", action="store_true",
                        help="rank by the recommender alone, without the LLM")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--stage", default=run_folder.AUTO, help="stage1 | stage2 | auto")
    parser.add_argument("--max_length", type=int, default=0,
                        help="prompt token limit (default: the run's config.prompts.max_length)")
    parser.add_argument("--batch_size", type=int, default=8, help="prompts per batch")
    parser.add_argument("--pairs_per_call", type=int, default=catalogue_ranking.PAIRS_PER_CALL,
                        help="(prompt, candidate) pairs scored per call: lower it for memory")
    parser.add_argument("--mesh", default="", help="device mesh (default: the run's)")
    args = parser.parse_args(argv)
    compilation_cache.enable()
    rerank = not args.recommender_only
    try:
        if args.input:
            requests, keys = _read_requests(args.input)
        else:
            history = _split(args.history) if args.history else _ids(args.history_ids)
            candidates = _split(args.candidates) if args.candidates else \
                (_ids(args.candidate_ids) if args.candidate_ids else None)
            requests, keys = [dict(history=history, candidates=candidates)], [None]
        recommender = Recommender.from_workdir(args.workdir, args.stage, args.max_length, args.mesh,
                                               args.pairs_per_call)
        results = recommender.recommend_many(requests, args.top, args.retrieve, rerank,
                                             args.batch_size)
    except (UnknownItemError, PromptTooLongError, ValueError, FileNotFoundError) as e:
        parser.exit(2, f"recommend: error: {e}\n")
    if args.input:
        lines = "".join(
            json.dumps(result.to_json(key), ensure_ascii=False) + "\n"
            for key, result in zip(keys, results))
        if args.output:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(lines)
        else:
            sys.stdout.write(lines)
    elif args.json:
        print(json.dumps(results[0].to_json(), ensure_ascii=False, indent=1))
    else:
        _print_text(results[0], recommender, rerank, requests[0]["candidates"] is not None)


if __name__ == "__main__":
    main()
