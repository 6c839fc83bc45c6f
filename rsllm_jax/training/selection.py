"""Which epoch's parameters a stage keeps (config.train.select_by; paper §5.1: early stopping
on validation).

Every epoch is trained (stages are a few epochs) and the best one by the validation metric is
kept, as the recommenders' training does:

  last                     the parameters after the last step
  val_nip                  the lowest validation NIP loss
  val_hit_ratio_at_1       the highest validation HitRatio@1, greedy answers judged by the
                           paper's rule (evaluation/answers.py)
  val_rank_hit_ratio_at_1  the highest validation HitRatio@1 of ranking the candidates by
                           likelihood (no generation: cheaper)

Ties keep the earlier epoch. The trainer saves the best parameters when they appear, so a killed
run that resumes (and replays the validation deterministically) keeps the same ones.
"""

METRICS = {
    "last": None, "val_nip": "nip", "val_hit_ratio_at_1": "hit_ratio_at_1",
    "val_rank_hit_ratio_at_1": "rank_hit_ratio_at_1"
}


class EpochSelection:
    """Scores a stage's per-epoch history by `select_by`; answers validation prompts with an
    evaluator built on first use (`make_evaluator()`, an evaluation.evaluate.Evaluator) when
    the metric needs answers."""

    def __init__(self, select_by, make_evaluator=None, eval_config=None):
        if select_by not in METRICS:
            raise ValueError(f"config.train.select_by={select_by!r}; expected one of "
                             f"{list(METRICS)}")
        self.metric = METRICS[select_by]
        self.needs_answers = self.metric not in (None, "nip")
        self._make_evaluator = make_evaluator
        self._evaluator = None
        self._eval_config = eval_config

    def answer_metrics(self, trainable):
        """Validation metrics of answering the prompts with `trainable`."""
        if self._evaluator is None:
            self._evaluator = self._make_evaluator()
        self._evaluator.set_trainable(trainable)
        generation = self.metric == "hit_ratio_at_1"
        metrics, _ = self._evaluator.evaluate_split(self._evaluator.dataset, "val",
                                                    self._eval_config.batch_size,
                                                    self._eval_config.max_new_tokens,
                                                    generation=generation, constrained=False,
                                                    ranking_by_likelihood=not generation,
                                                    log_every=0)
        return {k: v for k, v in metrics.items() if isinstance(v, float) and k != "seconds"}

    def best(self, history):
        """The history entry of the kept parameters, or None for `last`."""
        scored = [h for h in history if self.metric in h.get("val", {})]
        if self.metric is None or not scored:
            return None
        sign = 1.0 if self.metric == "nip" else -1.0  # Lower loss, higher hit ratio.
        return min(scored, key=lambda h: (sign * h["val"][self.metric], h["step"]))

    def is_best(self, history):
        """Whether the newest entry of `history` is the best so far."""
        best = self.best(history)
        return best is not None and best is history[-1]
