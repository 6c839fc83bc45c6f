"""Greedy generation of the `eval` step on real LastFM prompts, ours vs transformers' `generate`.

  python benchmarks/eval_generate.py --data PREPARED_DIR [--rows N] [--batch 8] [--all_measures]
      [--max_new_tokens 64] [--torch_threads N] [--split test] [--scan_layers]

The setup of the zero-shot LastFM row (README, Results): SmolLM2-135M-Instruct read from its
Q4_1 GGUF file (dequantised), float32, text prompts in the chat template, the test split,
constrained decoding and ranking off. Both sides answer exactly the same token ids, greedily,
with the same stop rule: at least one new token, at most `--max_new_tokens`, until EOS or the end
of the answer's first line (a line break after non-whitespace text, models/decode.py).

  ours       `Evaluator.evaluate_split`, the eval step's code (`--batch` answers in flight,
             each ended answer's slot taking the next prompt; the start all prompts share
             run once, each prompt's rest prefilled alone and padded to a multiple of 32;
             KV-cache decoding), called twice over the same rows: the
             first call compiles (into a fresh, empty persistent compilation cache), the second
             reuses the compiled programs.
  reference  transformers' LlamaForCausalLM with the same weights (our GGUF reader's tensors
             under their Hugging Face names), `generate` over the same batches of rows, each
             left-padded to its longest prompt; greedy, `min_new_tokens=1`, EOS, and a
             StoppingCriteria for the end of the first line (the same per-token rule).

Prints generated tokens per second (each row's new tokens, the stop token included, as the
evaluator counts them), wall times, the ratio, and how many rows' answers differ (float32
sums in other orders can flip a near-tie of two greedy choices, and the answer after it).
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"


def loadavg():
    with open("/proc/loadavg", encoding="utf-8") as f:
        return " ".join(f.read().split()[:3])


class FirstRows:
    """The first `n` rows of each split of a PreparedDataset (for quick runs)."""

    def __init__(self, dataset, n):
        self._dataset, self._n = dataset, n
        self.data_dir, self.manifest = dataset.data_dir, dataset.manifest
        self.catalogue = dataset.catalogue

    def source(self, split):
        return range(min(self._n, len(self._dataset.source(split))))

    def read(self, split, indices=None):
        return self._dataset.read(split, self.source(split) if indices is None else indices)


class CompileTime:
    """Seconds spent tracing to jaxprs, lowering to MLIR and compiling with XLA (the events
    of jax.monitoring), and the programs compiled, since the last `take()`."""

    EVENTS = {
        "/jax/core/compile/jaxpr_trace_duration": "tracing",
        "/jax/core/compile/jaxpr_to_mlir_module_duration": "lowering",
        "/jax/core/compile/backend_compile_duration": "XLA compile"
    }

    def __init__(self):
        import jax  # pylint: disable=g-import-not-at-top

        self.seconds, self.programs = {}, []
        jax.monitoring.register_event_duration_secs_listener(self._heard)

    def _heard(self, event, duration, **kwargs):
        if event in self.EVENTS:
            name = self.EVENTS[event]
            self.seconds[name] = self.seconds.get(name, 0.0) + duration
            if name == "XLA compile":
                self.programs.append(f"{kwargs.get('fun_name', '?')} {duration:.1f} s")

    def take(self):
        """A line that says where the time went, and resets."""
        line = ", ".join(f"{name} {self.seconds.get(name, 0.0):.1f} s"
                         for name in self.EVENTS.values())
        line += f"; {len(self.programs)} programs compiled: {', '.join(self.programs)}"
        self.seconds, self.programs = {}, []
        return line


def make_config(data_dir, batch, max_new_tokens, scan_layers=False):
    from configs import lastfm  # pylint: disable=g-import-not-at-top

    config = lastfm.get_config("zero_shot")
    config.jobs = "eval"
    config.model.name = MODEL
    config.model.dtype = "float32"
    config.prompts.chat_template = True
    config.eval.constrained = False
    config.eval.ranking = False
    config.eval.batch_size = batch
    config.eval.max_new_tokens = max_new_tokens
    config.data.dir = data_dir
    config.model.scan_layers = scan_layers
    return config


def answer_length(tokens, eos_id, line_classes):
    """New tokens up to and including the one that stops the row (decode.generate's rule)."""
    from rsllm_jax.models import decode  # pylint: disable=g-import-not-at-top

    seen_text = False
    for i, token in enumerate(tokens):
        bits = int(line_classes[token]) if token < len(line_classes) else 0
        line_end = bits & decode.NEWLINE and (seen_text or bits & decode.TEXT_THEN_NEWLINE)
        if token == eos_id or line_end:
            return i + 1
        seen_text = seen_text or bool(bits & decode.HAS_TEXT)
    return len(tokens)


def run_transformers(evaluator, dataset, split, batch, max_new_tokens, llama_config, tensors):
    """(answers, generated tokens, seconds) of transformers' generate on the evaluator's
    prompts, batch by batch as the evaluator takes them."""
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top

    from rsllm_jax.checkpoint import hf as hf_ckpt  # pylint: disable=g-import-not-at-top
    from rsllm_jax.data.pipeline import BatchIterator  # pylint: disable=g-import-not-at-top

    model = transformers.LlamaForCausalLM(hf_ckpt.config_to_hf(llama_config, "float32"))
    missing, unexpected = model.load_state_dict({k: torch.tensor(v)
                                                 for k, v in tensors.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    model.eval()
    classes = torch.as_tensor(evaluator.line_classes)
    eos, pad = evaluator.eos_id, evaluator.pad_id
    from rsllm_jax.models import decode  # pylint: disable=g-import-not-at-top

    class FirstLine(transformers.StoppingCriteria):
        """Stops a row at the end of its answer's first line (decode.generate's rule)."""

        def __init__(self, prompt_length):
            self.prompt_length = prompt_length
            self.seen_text = None

        def __call__(self, input_ids, scores, **kwargs):
            bits = classes[input_ids[:, -1]]
            if self.seen_text is None:
                self.seen_text = torch.zeros(len(input_ids), dtype=torch.bool)
            ends = ((bits & decode.NEWLINE) > 0) & (self.seen_text |
                                                    ((bits & decode.TEXT_THEN_NEWLINE) > 0))
            self.seen_text = self.seen_text | ((bits & decode.HAS_TEXT) > 0)
            return ends

    texts, generated = [], 0
    start = time.perf_counter()
    for rows in BatchIterator(dataset, split, batch, process_index=0, process_count=1):
        prompts = evaluator.encoder.encode_batch(rows)
        length = max(p.prompt_length for p in prompts)
        ids = np.full((len(prompts), length), pad, np.int64)
        mask = np.zeros((len(prompts), length), np.int64)
        for i, p in enumerate(prompts):
            ids[i, length - p.prompt_length:] = p.tokens[:p.prompt_length]
            mask[i, length - p.prompt_length:] = 1
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                max_new_tokens=max_new_tokens, min_new_tokens=1, do_sample=False, num_beams=1,
                eos_token_id=eos, pad_token_id=pad,
                stopping_criteria=transformers.StoppingCriteriaList([FirstLine(length)]))
        for row in out[:, length:].tolist():
            n = answer_length(row, eos, evaluator.line_classes)
            generated += n
            texts.append(
                evaluator.tokenizer.decode([t for t in row[:n] if t != eos],
                                           skip_special_tokens=True))
    return texts, generated, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="a prepared LastFM folder")
    parser.add_argument("--split", default="test")
    parser.add_argument("--rows", type=int, default=0, help="only the first N rows (0: all)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--torch_threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--skip_reference", action="store_true")
    parser.add_argument("--scan_layers", action="store_true",
                        help="ours runs the layers as one scanned block (config.model.scan_layers)")
    parser.add_argument(
        "--all_measures", action="store_true",
        help="ours also decodes constrained and ranks by likelihood, as `eval` "
        "does by default (transformers has no counterpart: implies "
        "--skip_reference)")
    args = parser.parse_args()

    # A fresh, empty persistent cache: the first call pays for every compilation.
    cache = tempfile.mkdtemp(prefix="jax_cache_")
    os.environ["RSLLM_COMPILATION_CACHE"] = cache
    from rsllm_jax import compilation_cache  # pylint: disable=g-import-not-at-top

    compilation_cache.enable()
    import jax  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top

    from rsllm_jax.checkpoint import gguf  # pylint: disable=g-import-not-at-top
    from rsllm_jax.data.storage import PreparedDataset  # pylint: disable=g-import-not-at-top
    from rsllm_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    print(f"load average at start: {loadavg()}")
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; CPUs: {os.cpu_count()}")
    config = make_config(args.data, args.batch, args.max_new_tokens, args.scan_layers)
    dataset = PreparedDataset(args.data)
    if args.rows:
        dataset = FirstRows(dataset, args.rows)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        evaluator = evaluate.Evaluator.from_workdir(config, workdir, dataset, "base")
    print(f"ours: model and tokenizer loaded in {time.perf_counter() - start:.1f} s")

    ours, compile_time = [], CompileTime()
    compile_time.take()
    for call in ("first call (compiles)", "second call"):
        start = time.perf_counter()
        metrics, predictions = evaluator.evaluate_split(dataset, args.split, args.batch,
                                                        args.max_new_tokens,
                                                        constrained=args.all_measures,
                                                        ranking_by_likelihood=args.all_measures,
                                                        log_every=0)
        seconds = time.perf_counter() - start
        tokens = sum(p["generated_tokens"] for p in predictions)
        ours.append((call, seconds, tokens, [p["generated"] for p in predictions]))
        print(f"ours, {call}: {len(predictions)} rows, {tokens} tokens, {seconds:.1f} s, "
              f"{tokens / seconds:.1f} tokens/s (ValidRatio {metrics['valid_ratio']:.4f}, "
              f"HR@1 {metrics['hit_ratio_at_1']:.4f}" +
              (f", constrained HR@1 {metrics['constrained_hit_ratio_at_1']:.4f}, ranking HR@1 "
               f"{metrics['rank_hit_ratio_at_1']:.4f}" if args.all_measures else "") +
              f")\n  {compile_time.take()}")
    if ours[0][3] != ours[1][3]:
        print("WARNING: the two calls' answers differ")
    if args.skip_reference or args.all_measures:
        print(f"load average at end: {loadavg()}")
        return

    llama_config, tensors, _ = gguf.read_gguf(MODEL)
    texts, tokens, seconds = run_transformers(evaluator, dataset, args.split, args.batch,
                                              args.max_new_tokens, llama_config, tensors)
    print(f"transformers generate: {len(texts)} rows, {tokens} tokens, {seconds:.1f} s, "
          f"{tokens / seconds:.1f} tokens/s")
    for call, ours_seconds, _, _ in ours:
        print(f"ratio (transformers time / ours), ours' {call}: {seconds / ours_seconds:.2f}x")
    differ = [i for i, (a, b) in enumerate(zip(ours[0][3], texts)) if a != b]
    print(f"answers that differ: {len(differ)} of {len(texts)} rows {differ[:20]}")
    print(f"load average at end: {loadavg()}")


if __name__ == "__main__":
    main()
