"""Speed of `recommend`: single-user latency and batch throughput, K = 50 and 200 retrieved items
re-ranked by the LLM, ours against transformers on the exported model.

  python benchmarks/recommend.py --workdir runs/demo300 --k 50,200 --users 32

Ours: `Recommender.recommend` (the recommender scores the catalogue; the prompt listing the K
items is run once into a KV cache; the K titles are scored against it in blocks). The
reference: transformers' LlamaForCausalLM on the run's export (`python -m rsllm_jax.export`,
made here unless `--export DIR` names one), the README's recipe for hybrid prompts, each of
the K candidates scored by a forward pass over prompt + title + EOS (batches of
`--torch_batch`), the way a user of the exported model without a shared cache does it. Both
score the same prompts; the largest difference of the log-likelihoods is printed as a check.
Timings exclude compilation (one warm-up call per shape). Run by hand, not in CI.
"""

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np


def ours_single(recommender, histories, k, repeats):
    """Median seconds of one user's recommendation, each shape compiled beforehand."""
    users = [histories[i % len(histories)] for i in range(repeats)]
    for history in users:  # Compiles every prompt length bucket these users need.
        recommender.recommend(history, retrieve=k)
    times = []
    for history in users:
        start = time.perf_counter()
        recommender.recommend(history, retrieve=k)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours_batch(recommender, histories, k, batch_size):
    """Users per second over all `histories`, in batches, after a pass that compiles."""
    requests = [dict(history=h) for h in histories]
    recommender.recommend_many(requests, retrieve=k, batch_size=batch_size)
    start = time.perf_counter()
    recommender.recommend_many(requests, retrieve=k, batch_size=batch_size)
    return len(requests) / (time.perf_counter() - start)


class TorchReference:
    """transformers on the exported model: every candidate scored by its own forward pass."""

    def __init__(self, export_dir, threads):
        import torch
        import transformers
        from safetensors.torch import load_file

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.join(export_dir, "hf"), dtype=torch.float32).eval()
        weights = load_file(os.path.join(export_dir, "rsllm.safetensors"))
        d_in = weights["projector.0.weight"].shape[1]
        d = weights["projector.0.weight"].shape[0]
        self.projector = torch.nn.Sequential(torch.nn.Linear(d_in, d), torch.nn.GELU(),
                                             torch.nn.Linear(d, d))
        self.projector.load_state_dict({
            k.removeprefix("projector."): v
            for k, v in weights.items() if k.startswith("projector.")
        })
        self.items = weights["item_embeddings"]
        with open(os.path.join(export_dir, "rsllm.json"), encoding="utf-8") as f:
            # Answers are base tokens: the added tokens' columns are no part of the scores.
            self.vocab = json.load(f)["first_new_token"]

    def scores(self, prompt, answers, batch):
        """Log-likelihood of each answer (token list) after the prompt (an EncodedPrompt)."""
        torch = self.torch
        ids = torch.tensor(prompt.tokens[:prompt.prompt_length])
        positions = torch.tensor([p for p, _ in prompt.placeholders], dtype=torch.long)
        items = torch.tensor([i for _, i in prompt.placeholders], dtype=torch.long)
        out = []
        with torch.no_grad():
            behaviour = self.projector(self.items[items])
            for start in range(0, len(answers), batch):
                chunk = answers[start:start + batch]
                width = max(len(a) for a in chunk)
                rows = torch.zeros((len(chunk), len(ids) + width), dtype=torch.long)
                mask = torch.zeros_like(rows)
                for j, answer in enumerate(chunk):  # Right padding: the prompt is shared.
                    rows[j, :len(ids)] = ids
                    rows[j, len(ids):len(ids) + len(answer)] = torch.tensor(answer)
                    mask[j, :len(ids) + len(answer)] = 1
                embeds = self.model.get_input_embeddings()(rows)
                embeds[:, positions] = behaviour
                logits = self.model(inputs_embeds=embeds, attention_mask=mask).logits
                log_probs = torch.log_softmax(logits[:, len(ids) - 1:-1, :self.vocab].float(),
                                              dim=-1)
                for j, answer in enumerate(chunk):
                    picked = log_probs[j, torch.arange(len(answer)), torch.tensor(answer)]
                    out.append(float(picked.sum()))
        return np.asarray(out)


def reference_single(reference, recommender, histories, k, repeats, batch):
    """(median seconds per user, largest |ours - theirs| over the users timed)."""
    from rsllm_jax.evaluation import catalogue_ranking

    times, worst = [], 0.0
    for i in range(repeats):
        history = histories[(i + 1) % len(histories)]
        ours = recommender.recommend(history, top=k, retrieve=k)
        start = time.perf_counter()
        [(ids, _)] = catalogue_ranking.retrieve(recommender.recommender_scores([history]),
                                                [history], k, recommender.excluded)
        listed = ids[catalogue_ranking.prompt_order(history, len(ids))]
        encoder = recommender.evaluator.encoder
        prompt = encoder.encode(history, listed, int(listed[0]))
        answers = [sum(encoder.answer_tokens(int(c)), []) for c in listed]
        theirs = reference.scores(prompt, answers, batch)
        times.append(time.perf_counter() - start)
        by_id = {r["item_id"]: r["score"] for r in ours.items}
        worst = max(worst, max(abs(by_id[int(c)] - s) for c, s in zip(listed, theirs)))
    return statistics.median(times), worst


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a finished run (stage 2)")
    parser.add_argument("--k", default="50,200", help="retrieved items to re-rank")
    parser.add_argument("--users", type=int, default=32, help="test users in the batch run")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max_length", type=int, default=2048)
    parser.add_argument("--export", default="", help="the run's export (default: made here)")
    parser.add_argument("--torch_batch", type=int, default=16)
    parser.add_argument("--torch_threads", type=int, default=2)
    parser.add_argument("--no_reference", action="store_true")
    args = parser.parse_args()

    from rsllm_jax import export
    from rsllm_jax.evaluation import catalogue_ranking
    from rsllm_jax.recommend import Recommender

    recommender = Recommender.from_workdir(args.workdir, max_length=args.max_length)
    rows = recommender.dataset.read("test")
    histories = [h[:n].tolist() for h, n in zip(rows["history"], rows["history_len"])]
    histories = (histories * (args.users // len(histories) + 1))[:args.users]
    reference = None
    if not args.no_reference:
        export_dir = args.export or os.path.join(tempfile.mkdtemp(), "export")
        if not args.export:
            export.export_run(args.workdir, export_dir)
        reference = TorchReference(export_dir, args.torch_threads)
    print(f"{args.workdir}: {recommender.catalogue.num_items} items, stage "
          f"{recommender.stage}, {recommender.evaluator.item_format} prompts")
    print("| K | prompt tokens | ours, 1 user | ours, batch of "
          f"{args.batch_size} | transformers, 1 user | ratio (1 user) | max |Δ score| |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for k in (int(x) for x in args.k.split(",")):
        lengths = []
        for history in histories[:args.batch_size]:
            [(ids, _)] = catalogue_ranking.retrieve(recommender.recommender_scores([history]),
                                                    [history], k, recommender.excluded)
            prompt = recommender.evaluator.encoder.encode(history, ids, int(ids[0]))
            lengths.append(prompt.prompt_length)
        single = ours_single(recommender, histories, k, args.repeats)
        throughput = ours_batch(recommender, histories, k, args.batch_size)
        cells = [
            k, f"{np.mean(lengths):.0f}", f"{single * 1000:.0f} ms", f"{throughput:.2f} users/s"
        ]
        if reference is not None:
            theirs, worst = reference_single(reference, recommender, histories, k, args.repeats,
                                             args.torch_batch)
            cells += [f"{theirs * 1000:.0f} ms", f"{theirs / single:.1f}×", f"{worst:.1e}"]
        else:
            cells += ["–", "–", "–"]
        print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
