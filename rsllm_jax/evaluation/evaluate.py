"""The `eval` pipeline step: the fine-tuned LLM answers the val/test prompts; ValidRatio and
HitRatio@1 as the paper measures them, and better measures beside them.

For every row of `config.eval.split` the prompt is built exactly as in training (same item
format, behavioural tokens, length policy) on the fixed candidate set, left-padded, and:
  1. greedy generation with the KV cache, as LLaRA generates (at least one token, at most
     `config.eval.max_new_tokens`, 64), until EOS (the terminator training taught) or the end
     of the answer's first line (leading line breaks do not end it), judged by the paper's rule
     and by a strict exact-title rule (`evaluation/answers.py`); `config.eval.batch_size`
     answers are generated at a time, each ended answer's slot taking the next prompt;
  2. with `config.eval.constrained`, greedy decoding restricted to the candidates' title tokens
     (a prefix trie), so every answer is a candidate: its hit ratio is the model's choice
     without the failure to name one;
  3. with `config.eval.ranking`, the log-likelihood of each candidate's title + EOS given the
     prompt (prompt cache shared by the 20 candidates) ranks the candidates: HR@1/3/5/10 and
     NDCG@5/10, the measures the conventional recommenders get.
Each prompt is run once: 2 and 3 continue the cache of its free generation, and the
constrained answer is read off the ranking's forward pass (`decode.constrained_choice`): the
same choice as decoding token by token, without the decoding steps.
Metrics go to `<workdir>/metrics/eval.json` (by the pipeline; `eval_<split>.json` for another
split than test) and per-row predictions to `<workdir>/metrics/predictions_<split>.jsonl`.

The evaluated model is `config.eval.stage`: `stage1`/`stage2` (their final trainable
parameters), `base` (the base LLM with no adapters: the zero-shot rows), or `auto`: the last
stage in `config.jobs`, else the last stage trained in the workdir, else `base`.
"""

import functools
import json
import time

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from rsllm_jax import config_lists, monitoring, run_paths
from rsllm_jax.data.pipeline import BatchIterator
from rsllm_jax.data.storage import PreparedDataset
from rsllm_jax.evaluation import answers, ranking
from rsllm_jax.models import base, decode, llama, rsllm
from rsllm_jax.parallel import layouts, mesh as mesh_lib
from rsllm_jax.prompts import batching, encoding, stages
from rsllm_jax.recommenders.embeddings import load_item_table

RANK_CUTOFFS = (1, 3, 5, 10)


def resolve_stage(config, workdir):
    """The stage whose parameters `eval` uses (see the module docstring)."""
    stage = config.eval.stage
    if stage not in ("auto", "base", *run_paths.STAGES):
        raise ValueError(f"config.eval.stage={stage!r}: expected auto, base, stage1 or stage2")
    if stage != "auto":
        return stage
    jobs = config_lists.names(config.jobs, "config.jobs")
    for candidate in reversed(run_paths.STAGES):
        if candidate in jobs:
            return candidate
    for candidate in reversed(run_paths.STAGES):
        if run_paths.final_path(run_paths.stage_dir(workdir, candidate)).exists():
            return candidate
    return "base"


def _item_format(config, stage):
    if config.eval.item_format:
        return config.eval.item_format
    return "text" if stage == "base" else config[stage].item_format


class Evaluator:
    """A model ready to answer prompts: generation, constrained decoding and candidate scoring.

    `trainable` holds the trained {"lora", "adapter"} collections; None evaluates the base LLM
    (no LoRA; fresh new-token rows and projector, which the `text` format never reads).
    `tokenizer` already has the tokens training added, in training's order (`first_new`: the
    first added id), so the new rows line up. With `replicated` (a sharding over the mesh the
    base parameters are sharded on) the item table and the trained parameters are copied to
    every device of that mesh, so one compiled function sees all its inputs on one mesh.
    `process_local`: that mesh holds only this process's devices, so on several processes each
    answers its own share of the rows (`evaluate_split`).
    """

    def __init__(self, config, dataset, item_format, llama_config, llama_params, tokenizer,
                 first_new, item_table, trainable=None, replicated=None, process_local=False):
        catalogue = dataset.catalogue
        self.process_local = process_local
        self.dataset = dataset
        self.item_format = item_format
        if trainable is None:
            llama_config = llama_config.replace(lora=None)
        self.tokenizer = tokenizer
        self.eos_id = int(tokenizer.eos_token_id)
        # EOS ends a trained answer; the end of the answer's first line ends what the answer
        # rules read (the base model of a zero-shot run rarely emits EOS), so decoding stops
        # at either, after at least one token, as LLaRA's generation (models/decode.py).
        self.stop_tokens = (self.eos_id, )
        self.line_classes = decode.token_line_classes(
            [tokenizer.decode([i]) for i in range(first_new)], llama_config.vocab_size)
        self.pad_id = 0 if tokenizer.pad_token_id is None else int(tokenizer.pad_token_id)
        self.first_new = first_new
        self.catalogue = catalogue
        self.model = rsllm.RSLLM(llama_config, num_new_tokens=len(tokenizer) - first_new,
                                 first_new_token=first_new)
        self.llm = llama.Llama(llama_config)
        self.encoder = encoding.PromptEncoder(tokenizer, catalogue, item_format,
                                              config.prompts.max_length, config.prompts.iid_tokens,
                                              config.prompts.chat_template)
        self.encoder.check_item_lengths(dataset.manifest["num_candidates"])
        self._replicated = replicated
        self.item_table = self._put(jnp.asarray(item_table))
        self.slots = dataset.manifest["max_history"] + dataset.manifest["num_candidates"]
        self.buckets = config_lists.ints(config.prompts.length_buckets,
                                         "config.prompts.length_buckets")
        self._embed = jax.jit(functools.partial(self.model.apply, method=rsllm.RSLLM.embed_inputs))
        if trainable is None:
            example = np.zeros((1, 1), np.int32)
            trainable = {
                rsllm.ADAPTER: self.model.init(jax.random.PRNGKey(config.model.init_seed), example,
                                               example.astype(bool),
                                               np.zeros((1, self.slots), np.int32), self.item_table,
                                               method=rsllm.RSLLM.embed_inputs)[rsllm.ADAPTER]
            }
        self._llama_params = llama_params
        self.set_trainable(trainable)

    def _put(self, tree):
        return tree if self._replicated is None else jax.device_put(tree, self._replicated)

    def set_trainable(self, trainable):
        """Evaluates other trained parameters (of the same shapes) from now on."""
        trainable = self._put(trainable)
        self.variables = {"params": {"llm": self._llama_params}, **trainable}
        self.llm_variables = {"params": self._llama_params}
        if "lora" in trainable:
            self.llm_variables["lora"] = trainable["lora"]["llm"]

    @classmethod
    def from_workdir(cls, config, workdir, dataset, stage):
        """The evaluator of `stage` (`base`, `stage1`, `stage2`) of the run in `workdir`."""
        # On several processes each holds the whole model on its own devices (the base
        # sharded over them) and answers its share of the rows: decoding needs no traffic
        # between hosts. On one, the stages' mesh: a base too large for one device is read
        # straight into its shards.
        process_local = jax.process_count() > 1
        if process_local:
            mesh = mesh_lib.make_mesh((1, -1, 1), devices=jax.local_devices())
            rules = config.mesh.rules
        else:
            mesh, rules = layouts.mesh_from_config(config.mesh)
        replicated = NamedSharding(mesh, P())
        # Before loading anything: a missing stage is the most likely mistake.
        trainable = None if stage == "base" else _restore_final(workdir, stage, replicated)
        item_format = _item_format(config, stage)
        catalogue = dataset.catalogue
        llama_config, llama_params, tokenizer = base.load_base_model(config, catalogue, workdir,
                                                                     mesh, rules)
        first_new = len(tokenizer)
        encoding.add_special_tokens(tokenizer,
                                    stages.item_formats(config) + [item_format],
                                    catalogue.num_items, config.prompts.iid_tokens)
        item_table = load_item_table(config, workdir, catalogue.num_items, item_format)
        return cls(config, dataset, item_format, llama_config, llama_params, tokenizer, first_new,
                   item_table, trainable, replicated=replicated, process_local=process_local)

    def prompt_arrays(self, prompts, multiple_of=None, start=0, end=None):
        """Left-padded prompt tokens, mask and input embeddings; padded to the length bucket,
        or to a multiple of `multiple_of` within it. With `start` / `end`, each prompt's tokens
        [start, end) only (`end` None: to the prompt's end)."""
        spans = [(start, p.prompt_length if end is None else end) for p in prompts]
        longest = max(stop - begin for begin, stop in spans)
        length = batching.bucket_for(longest, self.buckets, "a prompt")
        if multiple_of:
            length = min(length, -(-longest // multiple_of) * multiple_of)
        b = len(prompts)
        tokens = np.full((b, length), self.pad_id, np.int32)
        mask = np.zeros((b, length), bool)
        placeholder_mask = np.zeros((b, length), bool)
        # More placeholders than history + 20 candidates: prompts listing K retrieved items.
        most = max(len(p.placeholders) for p in prompts)
        placeholder_items = np.zeros((b, -(-max(most, 1) // self.slots) * self.slots), np.int32)
        for i, (p, (begin, stop)) in enumerate(zip(prompts, spans)):
            offset = length - (stop - begin)
            tokens[i, offset:] = p.tokens[begin:stop]
            mask[i, offset:] = True
            inside = [(position, item) for position, item in p.placeholders
                      if begin <= position < stop]
            for k, (position, item_id) in enumerate(inside):
                placeholder_mask[i, offset + position - begin] = True
                placeholder_items[i, k] = item_id
        embeddings = self._embed(self.variables, tokens, placeholder_mask, placeholder_items,
                                 self.item_table)
        return tokens, mask, embeddings

    def candidate_answers(self, candidates):
        """(rows, 20, steps) answer tokens (title + EOS) of every candidate, -1 padded, with a
        validity mask; `steps` is rounded up to a multiple of 8 to limit recompilation."""
        sequences = [[sum(self.encoder.answer_tokens(int(c)), []) for c in row]
                     for row in candidates]
        steps = max(len(s) for row in sequences for s in row)
        steps = -(-steps // 8) * 8
        out = np.full((len(sequences), len(sequences[0]), steps), -1, np.int32)
        for i, row in enumerate(sequences):
            for j, s in enumerate(row):
                out[i, j, :len(s)] = s
        return out, out >= 0

    def prefill(self, tokens, mask, embeddings, prefix=None):
        """The prompts' KV cache, which the scoring continues (`decode.score_packed` adds the
        slots its tokens need); `prefix`: the `Prefill` of a start they continue."""
        return decode.prefill(self.llm, self.llm_variables, tokens, mask, room=0,
                              embeddings=embeddings, prefix=prefix)

    def shared_start(self, prompts):
        """How many first tokens every prompt shares (the system prompt, the frame's first
        words), stopping before any behavioural token and before each prompt's last token."""
        first = prompts[0].tokens
        length = min(p.prompt_length for p in prompts) - 1
        for p in prompts:
            length = min([length] + [position for position, _ in p.placeholders])
            length = next((n for n in range(length) if p.tokens[n] != first[n]), length)
        return max(length, 0)

    def answer_all(self, prompts, candidates, slots, max_new_tokens, generation=True,
                   constrained=True, ranking=True, progress=None):
        """Every prompt's answers, each prompt prefilled once for all of them.

        `candidates` (rows, 20). Returns (texts, new tokens) of the greedy answers with
        `generation` (`slots` answers in flight, an ended answer's slot taking the next prompt:
        `decode.generate_queued`), the constrained answers' texts with `constrained`, and the
        candidates' log-likelihoods (rows, 20) with `ranking` (None for a measure that is
        off). The last two come from one scoring pass of the 20 candidates' answers, packed,
        on the prompt's cache (`decode.score_packed`, `decode.constrained_choice`).
        `progress(n)` hears the number of prompts done.
        """
        if not prompts:
            return [], np.zeros(0, np.int32), [], np.zeros((0, candidates.shape[1]))
        # The start all prompts share is run once; each prompt then prefills only the rest,
        # alone, padded to a multiple of 32 tokens (a handful of shapes, each compiled once),
        # not to a batch's length bucket.
        shared = self.shared_start(prompts)
        prefix = self.prefill(
            *self.prompt_arrays(prompts[:1], multiple_of=1, end=shared)) if shared else None
        arrays = [self.prompt_arrays([p], multiple_of=32, start=shared) for p in prompts]
        scoring = constrained or ranking
        scored = [None] * len(prompts)
        if scoring:
            answer_tokens, answer_mask = self.candidate_answers(candidates)
            # One packed length for the split: one shape per prompt length.
            packed = decode.pack_continuations(answer_tokens, answer_mask)

        def score(i, prefilled):
            scored[i] = decode.score_packed(self.llm, self.llm_variables, prefilled,
                                            decode.Packed(*(x[i:i + 1] for x in packed)))

        texts = lengths = chosen = scores = None
        if generation:
            answers, lengths = decode.generate_queued(
                self.llm, self.llm_variables, arrays, slots=slots, max_new_tokens=max_new_tokens,
                stop_tokens=self.stop_tokens, pad_id=self.pad_id, vocab_limit=self.first_new,
                min_new_tokens=1, line_classes=self.line_classes, progress=progress,
                each_prefill=score if scoring else None, prefix=prefix)
            texts = [self._text(answer) for answer in answers]
        elif scoring:
            for i, (tokens, mask, embeddings) in enumerate(arrays):
                score(i, self.prefill(tokens, mask, embeddings, prefix))
                if progress is not None:
                    progress(i + 1)
        if scoring:
            log_probs, logits = (np.concatenate(x) for x in zip(*jax.device_get(scored)))
            scores, token_logits = decode.unpack_scores(packed, log_probs, logits,
                                                        *answer_tokens.shape[1:])
            if constrained:
                choice = decode.constrained_choice(answer_tokens, answer_mask, token_logits)
                chosen = [
                    self._text(answer_tokens[i, c][answer_mask[i, c]]) for i, c in enumerate(choice)
                ]
        return texts, lengths, chosen, scores if ranking else None

    def _text(self, tokens):
        """An answer's text: its tokens decoded, EOS left out."""
        return self.tokenizer.decode([int(t) for t in tokens if int(t) != self.eos_id],
                                     skip_special_tokens=True)

    def score(self, prefilled, continuations, continuation_mask):
        """Log-likelihood (rows, 20) of each candidate's answer tokens."""
        return np.asarray(
            decode.score_continuations(self.llm, self.llm_variables, prefilled,
                                       np.maximum(continuations, 0), continuation_mask))

    def evaluate_split(self, dataset, split, batch_size, max_new_tokens=64, generation=True,
                       constrained=True, ranking_by_likelihood=True, log_every=10):
        """(metrics, per-row predictions) over one split; see the module docstring.

        A process-local evaluator on several processes answers its slice of every batch and
        the rows are gathered (in the order of one process) before the metrics."""
        # Otherwise (global arrays) every process takes part in every row.
        split_rows = self.process_local and jax.process_count() > 1
        rows_iter = BatchIterator(dataset, split, batch_size,
                                  process_index=jax.process_index() if split_rows else 0,
                                  process_count=jax.process_count() if split_rows else 1)
        predictions, batch_of_row, start = [], [], time.time()
        paper, strict, choices, rank_of_target = [], [], [], []
        share = jax.process_count() if split_rows else 1  # Rows of every process.
        batches = []
        for rows in rows_iter:
            prompts = self.encoder.encode_batch(rows)
            if prompts:
                batches.append(
                    (prompts, np.asarray(rows["candidates"])[np.asarray(rows["mask"], bool)]))
        every = [p for prompts, _ in batches for p in prompts]
        bar = monitoring.progress(rows_iter.num_rows, f"eval {split}", unit="row") \
            if log_every else None
        logged = 0  # Rows at the last log line: one every `log_every` batches' rows.

        def progress(n):
            nonlocal logged
            done = min(n * share, rows_iter.num_rows)
            bar.update(done - bar.n)
            if done - logged >= log_every * batch_size or done == rows_iter.num_rows:
                logging.info("eval %s: %d/%d rows", split, done, rows_iter.num_rows)
                logged = done

        # The whole split at once: `batch_size` answers in flight, each ended answer's slot
        # taking the next prompt, so no step runs for ended rows while one long answer goes on.
        texts, lengths, chosen, scores = self.answer_all(
            every,
            np.concatenate([candidates for _, candidates in batches]) if batches else np.zeros(
                (0, dataset.manifest["num_candidates"]), np.int64), rows_iter.host_batch_size,
            max_new_tokens, generation, constrained, ranking_by_likelihood,
            progress=progress if log_every else None)
        if bar is not None:
            bar.close()
        logging.info("eval %s: %d rows answered in %.1fs", split, len(every), time.time() - start)
        first = 0  # Index of the batch's first prompt.
        for batch_index, (prompts, candidates) in enumerate(batches):
            for i, p in enumerate(prompts):
                titles = [self.catalogue.title(int(c)) for c in candidates[i]]
                target_index = int(np.flatnonzero(candidates[i] == p.target)[0])
                record = dict(row_id=p.row_id, target=p.target, prompt_length=p.prompt_length,
                              history_dropped=p.num_history_dropped)
                if generation:
                    text = texts[first + i]
                    by_paper = answers.paper_match(text, titles, self.catalogue.title(p.target))
                    by_strict = answers.strict_match(text, titles, target_index)
                    paper.append(by_paper)
                    strict.append(by_strict)
                    record.update(generated=text, generated_tokens=int(lengths[first + i]),
                                  matched=[int(candidates[i][j]) for j in by_paper.matched],
                                  valid=by_paper.valid, hit=by_paper.hit,
                                  strict_valid=by_strict.valid, strict_hit=by_strict.hit)
                if constrained:
                    by_choice = answers.strict_match(chosen[first + i], titles, target_index)
                    choices.append(by_choice)
                    record.update(constrained=chosen[first + i], constrained_hit=by_choice.hit)
                if ranking_by_likelihood:
                    row_scores = scores[first + i]
                    rank = int(ranking.ranks(row_scores[None], np.array([target_index]))[0])
                    rank_of_target.append(rank)
                    order = np.argsort(-row_scores, kind="stable")
                    record.update(target_rank=rank,
                                  ranked=[int(candidates[i][j]) for j in order[:5]])
                predictions.append(record)
                batch_of_row.append(batch_index)
            first += len(prompts)
        if split_rows:
            predictions, paper, strict, choices, rank_of_target = _gather_rows(
                batch_of_row, predictions, paper, strict, choices, rank_of_target)
        metrics = dict(split=split, n=len(predictions), item_format=self.item_format)
        if generation:
            metrics["valid_ratio"], metrics["hit_ratio_at_1"] = answers.ratios(paper)
            metrics["hit_ratio_among_valid"] = answers.hit_ratio_among_valid(paper)
            metrics["strict_valid_ratio"], metrics["strict_hit_ratio_at_1"] = \
                answers.ratios(strict)
            metrics["strict_hit_ratio_among_valid"] = answers.hit_ratio_among_valid(strict)
        if constrained:
            metrics["constrained_valid_ratio"], metrics["constrained_hit_ratio_at_1"] = \
                answers.ratios(choices)
        if rank_of_target:
            rank = np.asarray(rank_of_target)
            for k in RANK_CUTOFFS:
                metrics[f"rank_hit_ratio_at_{k}"] = float(ranking.hit_ratio(rank, k).mean())
            for k in (5, 10):
                metrics[f"rank_ndcg_at_{k}"] = float(ranking.ndcg(rank, k).mean())
        metrics["history_dropped_rows"] = sum(1 for p in predictions if p["history_dropped"])
        metrics["seconds"] = round(time.time() - start, 2)
        return metrics, predictions


def _gather_rows(batch_of_row, predictions, paper, strict, choices, rank_of_target):
    """Every process's rows on every process, in the order one process would have produced
    them: batch by batch, each batch's slices in process order. `batch_of_row`: the batch
    index of each of this process's rows."""
    as_lists = lambda js: [[list(j.matched), j.valid, j.hit] for j in js]  # noqa: E731
    mine = dict(batch=batch_of_row, predictions=predictions, paper=as_lists(paper),
                strict=as_lists(strict), choices=as_lists(choices), ranks=rank_of_target)
    rows = []
    for process, part in enumerate(mesh_lib.gather_json(mine)):
        for i, batch in enumerate(part["batch"]):
            rows.append(((batch, process, i), part, i))
    rows.sort(key=lambda row: row[0])
    pick = lambda key: [part[key][i] for _, part, i in rows if part[key]]  # noqa: E731
    judgements = lambda key: [
        answers.Judgement(tuple(m), v, h)  # noqa: E731
        for m, v, h in pick(key)
    ]
    return (pick("predictions"), judgements("paper"), judgements("strict"), judgements("choices"),
            pick("ranks"))


def _restore_final(workdir, stage, sharding):
    """A stage's kept trainable parameters, each placed whole with `sharding`."""
    path = run_paths.final_path(run_paths.stage_dir(workdir, stage))
    if not path.exists():
        raise FileNotFoundError(f"{path}: no trained parameters for this stage; run the "
                                "stage first or set config.eval.stage")
    from rsllm_jax import run_folder  # pylint: disable=g-import-not-at-top

    return run_folder.restore_trainable(workdir, stage, sharding)


def evaluate(config, workdir, split=None):
    """The evaluation of the module docstring for config.eval; (metrics, predictions)."""
    e = config.eval
    split = split or e.split
    dataset = PreparedDataset(run_paths.data_dir(config, workdir))
    if split not in dataset.splits:
        raise ValueError(f"{dataset.data_dir} has no {split!r} split (has {dataset.splits})")
    stage = resolve_stage(config, workdir)
    evaluator = Evaluator.from_workdir(config, workdir, dataset, stage)
    full, per_row = {}, {}
    if e.get("retrieve_k", 0) > 0:  # First: a run without a recommender fails at once.
        full, per_row = full_catalogue_evaluation(config, workdir, evaluator, dataset, split)
    metrics, predictions = evaluator.evaluate_split(dataset, split, e.batch_size, e.max_new_tokens,
                                                    constrained=e.constrained,
                                                    ranking_by_likelihood=e.ranking)
    metrics.update(full)
    for record in predictions:
        record.update(per_row.get(record["row_id"], {}))
    return dict(metrics, stage=stage), predictions


def full_catalogue_evaluation(config, workdir, evaluator, dataset, split):
    """HitRatio@10 / NDCG@10 over the whole catalogue on `split`, for the run's recommender
    alone and for its top config.eval.retrieve_k items re-ranked by `evaluator`'s LLM
    (evaluation/catalogue_ranking.py); (metrics, {row id: per-row ranks})."""
    from rsllm_jax.data.candidates import excluded_items
    from rsllm_jax.evaluation import catalogue_ranking
    from rsllm_jax.recommenders import saved, train

    catalogue = dataset.catalogue
    table_path = run_paths.item_table_path(config, workdir)
    model, params, _ = saved.load_recommender(config, workdir, catalogue.num_items, table_path)
    score_fn = train.make_score_fn(model)
    excluded = np.flatnonzero(
        excluded_items(catalogue, dataset.manifest["settings"]["exclude_empty_titles"]))
    start = time.time()
    metrics, per_row = catalogue_ranking.full_catalogue_metrics(evaluator,
                                                                lambda h, n: score_fn(params, h, n),
                                                                dataset.read(split),
                                                                config.eval.retrieve_k,
                                                                config.eval.batch_size, excluded)
    logging.info("eval %s: whole catalogue %s in %.1fs", split, metrics, time.time() - start)
    return metrics, per_row


def run_step(config, workdir):
    """The `eval` step: evaluates, writes the per-row predictions, returns the metrics."""
    metrics, predictions = evaluate(config, workdir)
    path = run_paths.predictions_path(workdir, metrics["split"])
    if jax.process_index() == 0:
        run_paths.write_text(
            path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in predictions))
    with monitoring.MetricWriter(run_paths.as_path(workdir) / "eval") as writer:
        writer.write(0, {k: v for k, v in metrics.items() if k != "seconds"}, metrics["split"])
    logging.info("eval: %s", {k: v for k, v in metrics.items()})
    return metrics
