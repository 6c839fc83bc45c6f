"""What the training loop costs beyond its steps: wall time of N loop updates minus N × the
pure jitted update time, as a fraction of the latter.

  python benchmarks/loop_overhead.py --workdir DIR [--updates 20] [--rounds 3]
      [--shapes demo,bench] [--data PREPARED_LASTFM]

For each shape, one stage-2 build (training/trainer.py: build_stage, a fresh LoRA, a random
item table) and the same updates timed three ways, in one run:

  pure      the jitted step alone over the loop's own batches, collated and placed on the
            devices beforehand, back to back (the device never waits)
  before    the loop as it was: batches collated in the loop, metrics taken off the device
            after every update (prefetch 0, log_every 1)
  after     the loop now: batches collated in a background thread (prefetch 2), metrics off
            the device every 20 steps

Every variant runs the same compiled step on the same batches from the same initial state; the
final parameters of `before` and `after` are compared (they must be equal). The three run in
turn, `--rounds` times, and each prints its median (a shared virtual machine's speed drifts by
tens of percent between minutes; within a round the variants see the same machine). Shapes:

  demo   the demo's stage 2 (configs/demo.py: tiny Llama d 128 / 2 layers, float32, batch 16,
         synthetic prompts)
  bench  benchmarks/stage2_cpu.py's shape: the `bench` Llama (d 256 / 4 layers), real LastFM
         prompts (--data, a prepared LastFM folder), batch 16, hybrid format, LoRA dropout 0.1
         and both towers (the tokenizer here is the preset's, trained on the dataset, not
         SmolLM2's)

Run by hand, on an idle machine (the load average is printed); not in CI.
"""

import argparse
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import demo, lastfm  # noqa: E402
from rsllm_jax import main as pipeline  # noqa: E402
from rsllm_jax.data.storage import PreparedDataset  # noqa: E402
from rsllm_jax.models.base import restore_like  # noqa: E402
from rsllm_jax.prompts import batching  # noqa: E402
from rsllm_jax.recommenders import embeddings  # noqa: E402
from rsllm_jax.training import trainer  # noqa: E402


def _config(shape, workdir, data, updates):
    if shape == "demo":
        config = demo.get_config()
        config.jobs = "prepare"
    else:
        config = lastfm.get_config()
        config.model.name = "bench"
        config.model.dtype = "float32"
        config.model.lora_dropout = 0.1
        config.data.dir = data
        config.train.batch_size = 16
        config.train.accumulation_steps = 1
        config.prompts.length_buckets = "256,384,512,768,1024"
    config.stage2.init_from_stage1 = False
    config.pretrain.steps = 0  # A random base: speed does not depend on what it learnt.
    config.stage2.max_steps = updates * config.train.accumulation_steps
    config.train.checkpoint_every = 10**6  # Only the final save, after the timed updates.
    config.train.select_by = "last"
    return config


def _random_table(config, workdir):
    dataset = PreparedDataset(config.data.dir or os.path.join(workdir, "data"))
    num_items = dataset.catalogue.num_items
    table = np.random.default_rng(0).normal(size=(num_items + 1, config.rec.hidden_size))
    path = os.path.join(workdir, "random_items.npy")
    embeddings.save_item_embeddings(path, table, num_items=num_items, model=config.rec.model,
                                    source="random")
    config.prompts.item_embeddings = path


def _pure(stage, state, updates_batches):
    """Seconds of the jitted updates alone over pre-placed batches (after a warm-up of every
    shape), and the state after them."""
    step_fn, layout = stage.program.step_fn, stage.program.layout
    placed = [layout.put_batch(b, stacked=True) for b in updates_batches]
    warm = jax.tree.map(jnp.copy, state)
    seen = set()
    for batch in placed:  # Compile every bucket the loop meets, outside the timings.
        shape = tuple((key, value.shape) for key, value in sorted(batch.items()))
        if shape not in seen:
            seen.add(shape)
            warm, metrics = step_fn(warm, stage.frozen, batch, stage.item_table)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for batch in placed[1:]:  # As the loop's rate: every update after the first.
        state, metrics = step_fn(state, stage.frozen, batch, stage.item_table)
    jax.block_until_ready(metrics)
    return time.perf_counter() - start


def _loop(stage, initial_state, data_state, prefetch, log_every):
    """Runs trainer.train on a fresh copy of the initial state; (train_seconds, trainable)."""
    shutil.rmtree(stage.stage_dir, ignore_errors=True)
    stage.config.train.prefetch = prefetch
    stage.config.train.log_every = log_every
    stage.state = jax.tree.map(jnp.copy, initial_state)
    stage.train_rows.set_state(data_state)
    metrics = trainer.train(stage)
    final = restore_like(os.path.join(stage.stage_dir, "final"), initial_state.trainable)
    return metrics["train_seconds"], final


def measure(shape, workdir, data, updates, rounds):
    config = _config(shape, workdir, data, updates)
    os.makedirs(workdir, exist_ok=True)
    if shape == "demo":
        pipeline.run_pipeline(config, workdir)  # prepare
    _random_table(config, workdir)
    stage = trainer.build_stage(config, workdir, "stage2")
    data_state = stage.train_rows.get_state()
    k = stage.accumulation
    batches = []
    for update in range(updates):
        micro = [stage.make_batch(next(stage.train_rows), update * k + i) for i in range(k)]
        batches.append(batching.stack(micro))
    initial = jax.tree.map(jnp.copy, stage.state)
    timings = dict(pure=[], before=[], after=[])
    for _ in range(rounds):
        timings["pure"].append(_pure(stage, jax.tree.map(jnp.copy, initial), batches))
        seconds, before_params = _loop(stage, initial, data_state, prefetch=0, log_every=1)
        timings["before"].append(seconds)
        seconds, after_params = _loop(stage, initial, data_state, prefetch=2, log_every=20)
        timings["after"].append(seconds)
    pure, before, after = (float(np.median(timings[key])) for key in ("pure", "before", "after"))
    same = all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(before_params), jax.tree.leaves(after_params)))
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[1:])
    print(f"{shape}: {updates - 1} timed updates (batch {config.train.batch_size} × {k}), "
          f"{tokens / (updates - 1):.0f} real tokens per update")
    print(f"  pure jitted step   {pure:8.2f} s  {pure / (updates - 1) * 1e3:8.1f} ms/update")
    for name, seconds in (("loop before", before), ("loop after", after)):
        print(f"  {name:18s} {seconds:8.2f} s  {seconds / (updates - 1) * 1e3:8.1f} ms/update"
              f"  overhead {seconds / pure - 1:+.1%}")
    print(f"  before/after: {before / after:.2f}x; final parameters equal: {same}")
    print("  every round (s): " + "; ".join(f"{key} {', '.join(f'{t:.2f}' for t in values)}"
                                            for key, values in timings.items()))
    return dict(pure=pure, before=before, after=after, same=same)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shapes", default="demo,bench")
    parser.add_argument("--data", default="", help="prepared LastFM folder (bench shape)")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}; "
          f"{jax.devices()[0].device_kind} × {jax.device_count()}")
    for shape in args.shapes.split(","):
        if shape == "bench" and not args.data:
            parser.error("--shapes bench needs --data PREPARED_LASTFM")
        measure(shape, os.path.join(args.workdir, shape), args.data, args.updates, args.rounds)
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")


if __name__ == "__main__":
    main()
