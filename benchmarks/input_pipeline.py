"""Input pipeline throughput: our BatchIterator vs LLaRA's way of building training batches.

  python benchmarks/input_pipeline.py --data PREPARED_DIR [--steps 100] [--batch 256]

Both produce the same content per train row: history, target and 20 candidates (19 negatives
uniform over the catalogue minus history and target, target at a random slot). The reference
does it as LLaRA's data code does, row by row in Python: a list comprehension over the whole
catalogue to build the allowed set, `random.sample`, `random.shuffle`, and a list of dicts
collated into arrays. Ours reads the array_record source, permutes by seed and draws every
row's candidates with a vectorised counter-based hash. Prints rows/s for both and the ratio.
"""

import argparse
import random
import time

import numpy as np

from rsllm_jax.data.pipeline import BatchIterator
from rsllm_jax.data.storage import PreparedDataset


def reference_batches(rows, num_items, batch_size, steps, seed):
    """LLaRA-style batches: per-row Python negative sampling and collation."""
    rng = random.Random(seed)
    order = list(range(len(rows["target"])))
    rng.shuffle(order)
    item_ids = list(range(num_items))
    for step in range(steps):
        examples = []
        for i in order[step * batch_size:(step + 1) * batch_size]:
            history = rows["history"][i, :rows["history_len"][i]].tolist()
            target = int(rows["target"][i])
            allowed = [j for j in item_ids if j not in history and j != target]
            candidates = rng.sample(allowed, 19) + [target]
            rng.shuffle(candidates)
            examples.append(dict(history=rows["history"][i], target=target, candidates=candidates))
        yield {key: np.asarray([e[key] for e in examples]) for key in examples[0]}


def rows_per_second(batches, steps, batch_size):
    start = time.perf_counter()
    for _ in range(steps):
        next(batches)
    return steps * batch_size / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="A prepared dataset folder.")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    dataset = PreparedDataset(args.data)
    num_items = dataset.catalogue.num_items
    steps = min(args.steps, dataset.num_rows("train") // args.batch)
    results = {}
    for name, in_memory in (("ours (on-demand reads)", False), ("ours (in memory)", True)):
        iterator = BatchIterator(dataset, "train", args.batch, seed=0, in_memory=in_memory,
                                 process_index=0, process_count=1)
        next(iterator)  # Opening the source and the first permutation are not per-step costs.
        results[name] = rows_per_second(iterator, steps - 1, args.batch)
    rows = dataset.read("train")
    results["reference (LLaRA-style)"] = rows_per_second(
        reference_batches(rows, num_items, args.batch, steps, seed=0), steps, args.batch)
    print(f"{dataset.name}: {dataset.num_rows('train')} train rows, {num_items} items, "
          f"batch {args.batch}, {steps} steps")
    for name, value in results.items():
        print(f"  {name:26s} {value:12,.0f} rows/s")
    reference = results["reference (LLaRA-style)"]
    for name in ("ours (on-demand reads)", "ours (in memory)"):
        print(f"  ratio {name} / reference: {results[name] / reference:.1f}x")


if __name__ == "__main__":
    main()
