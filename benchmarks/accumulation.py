"""What full-batch InfoNCE costs: one stage-2 update of k accumulated micro-batches, the
contrastive terms over the whole batch (gradient caching) vs within each micro-batch.

  python benchmarks/accumulation.py --data PREPARED_DIR [--micro_batch 8] [--accumulation 8]
      [--updates 2] [--warmup 1]

Same prompts, model and loss as benchmarks/stage2_cpu.py (real LastFM train prompts in the
hybrid format, SmolLM2's tokenizer, the `bench` Llama shape, LoRA r 8 with dropout 0.1, both
towers), one optimiser update per k micro-batches:

  micro-batch negatives  the accumulation the stages used before: the one-micro-batch step
                         called k times under optax.MultiSteps, each InfoNCE term seeing only
                         its micro-batch's rows as negatives
  gradient caching       the stages' step now (training/train_step.py): a forward pass of both
                         towers per micro-batch, the full-batch InfoNCE, then each micro-batch's
                         forward and backward

Prints seconds per update of each and their ratio (the price of pass 1).
"""

import argparse
import os
import tempfile
import time

import numpy as np

from stage2_cpu import (BENCH_SHAPE, BETA, GAMMA, GRAD_CLIP, ITEM_DIM, LEARNING_RATE, LORA_ALPHA,
                        LORA_DROPOUT, LORA_RANK, TEMPERATURE, WEIGHT_DECAY, make_batches)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="prepared dataset (LastFM)")
    parser.add_argument("--micro_batch", type=int, default=8)
    parser.add_argument("--accumulation", type=int, default=8)
    parser.add_argument("--updates", type=int, default=2, help="timed updates")
    parser.add_argument("--warmup", type=int, default=1, help="untimed updates (compilation)")
    parser.add_argument("--lora_dropout", type=float, default=LORA_DROPOUT)
    return parser.parse_args()


def main():
    args = parse_args()
    import jax
    import jax.numpy as jnp
    import optax

    from configs import base
    from rsllm_jax.models import llama, lora as lora_lib, rsllm
    from rsllm_jax.parallel import mesh as mesh_lib
    from rsllm_jax.prompts import batching
    from rsllm_jax.training import optim, train_step as train_step_lib

    k = args.accumulation
    updates = args.warmup + args.updates
    with tempfile.TemporaryDirectory() as workdir:
        batches, info = make_batches(args.data, args.micro_batch, updates * k, workdir)
    config = llama.get_config(
        BENCH_SHAPE, vocab_size=info["base_vocab"], dtype="float32", pad_token_id=0,
        lora=lora_lib.LoraConfig(rank=LORA_RANK, alpha=LORA_ALPHA, dropout=args.lora_dropout))
    model = rsllm.RSLLM(config, num_new_tokens=info["num_new"], first_new_token=info["base_vocab"],
                        deterministic=args.lora_dropout == 0)
    # The real train config (every field make_optimizer reads), with this benchmark's values.
    train = base.get_config().train
    train.update(
        dict(learning_rate=LEARNING_RATE, warmup_ratio=0.0, decay="constant",
             weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP, accumulation_steps=k, gamma=GAMMA,
             beta=BETA, temperature=TEMPERATURE, symmetric_infonce=False))
    item_table = jnp.asarray(
        np.random.default_rng(0).normal(size=(info["num_items"] + 1, ITEM_DIM)).astype(np.float32))
    frozen = {
        "params": {
            "llm": mesh_lib.init_sharded(llama.Llama(config.replace(lora=None)),
                                         jax.random.PRNGKey(0), jnp.ones((1, 1),
                                                                         jnp.int32))["params"]
        }
    }
    trainable = mesh_lib.init_sharded(model, jax.random.PRNGKey(1),
                                      {k_: jnp.asarray(v)
                                       for k_, v in batches[0].items()}, item_table,
                                      collections=rsllm.TRAINABLE)
    groups = [batches[i * k:(i + 1) * k] for i in range(updates)]

    def timed(run):
        for group in groups[:args.warmup]:
            run(group)
        start = time.perf_counter()
        for group in groups[args.warmup:]:
            run(group)
        return (time.perf_counter() - start) / args.updates

    # Before: one micro-batch per call, gradients averaged by optax.MultiSteps.
    multi = optax.MultiSteps(optim.make_optimizer(train, 1000), every_k_schedule=k)
    old_step = jax.jit(train_step_lib.make_train_step(model, multi, train), donate_argnums=0)
    holder = {"state": train_step_lib.create_state(trainable, multi, 0)}

    def per_micro_batch(group):
        for batch in group:
            holder["state"], metrics = old_step(holder["state"], frozen,
                                                {k_: v[None]
                                                 for k_, v in batch.items()}, item_table)
        float(metrics["total"])

    # Now: the k micro-batches stacked, one call.
    optimizer = optim.make_optimizer(train, 1000)
    new_step = jax.jit(train_step_lib.make_train_step(model, optimizer, train), donate_argnums=0)
    # A copy: the first step donates (deletes) the arrays its state was made of.
    holder["new"] = train_step_lib.create_state(jax.tree.map(jnp.array, trainable), optimizer, 0)

    def gradient_caching(group):
        holder["new"], metrics = new_step(holder["new"], frozen, batching.stack(group), item_table)
        float(metrics["total"])

    before = timed(per_micro_batch)
    after = timed(gradient_caching)
    tokens = np.mean([sum(int(b["attention_mask"].sum()) for b in g) for g in groups])
    # One stacked update pads every micro-batch to the longest bucket among them.
    own = np.mean([sum(b["tokens"].size for b in g) for g in groups])
    stacked = np.mean([batching.stack(g)["tokens"].size for g in groups])
    print(f"stage-2 update, {k} micro-batches of {args.micro_batch} ({k * args.micro_batch} "
          f"rows, {tokens:.0f} prompt tokens, {own:.0f} positions in their own buckets, "
          f"{stacked:.0f} stacked), {BENCH_SHAPE} shape, LoRA dropout {args.lora_dropout}, "
          f"{info['tokenizer']} tokenizer; {jax.devices()[0].device_kind}, load average "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"  micro-batch negatives (optax.MultiSteps): {before:7.2f} s per update")
    print(f"  full-batch negatives (gradient caching):  {after:7.2f} s per update")
    print(f"  ratio: {after / before:.2f}x the time")


if __name__ == "__main__":
    main()
