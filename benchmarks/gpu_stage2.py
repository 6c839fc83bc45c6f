"""The RSLLM stage-2 train step at Llama-2-7B shapes on one GPU: step time, tokens/s, MFU, memory.

  python benchmarks/gpu_stage2.py [--model llama2_7b] [--batch 4] [--length 512] [--steps 5]
      [--remat none|full|dots|dots_no_batch] [--cap_gb 24] [--search 1,2,4,8]

Random weights, no download: the frozen base is initialised directly on the device in
bfloat16, LoRA (r 8, alpha 32, dropout 0.1, all seven projections), the projector and the
added-token rows in float32; compute in bfloat16. Synthetic batches shaped like the trainer's:
random token ids with 30 behavioural-token placeholders per prompt (10 history items and 20
candidates), an answer of --answer tokens, and a target tower over --target tokens.

MFU counts model FLOPs only (no rematerialisation), honestly for a frozen base: forward 2N per
token, backward 2N (activation gradients only: the base gets no weight gradients), causal
attention (half the score matrix) forward and twice that backward, LoRA forward plus both
gradients, and the output layer only at the answer positions. Peak: --peak_tflops (989 dense
bf16 for H100/H200 SXM).

--cap_gb limits JAX's memory pool (XLA_PYTHON_CLIENT_MEM_FRACTION, set before JAX starts) to
see what fits a smaller card. --search compiles the step for each batch size and remat policy
and compares XLA's memory estimate with the cap, without running it.
`--model tiny` runs anywhere (CPU smoke test).
"""

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama2_7b", help="a preset of llama.CONFIGS")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512, help="prompt bucket (tokens)")
    parser.add_argument("--answer", type=int, default=16, help="answer bucket")
    parser.add_argument("--target", type=int, default=16, help="target-tower bucket")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--remat", default="none", help="remat policy of the timed run")
    parser.add_argument("--scan_layers", type=int, default=1,
                        help="1: one scanned layer (fast compilation at 32 layers)")
    parser.add_argument("--lora_dropout", type=float, default=0.1)
    parser.add_argument("--attention_impl", default=None, help="xla or cudnn; default: JAX's")
    parser.add_argument("--cap_gb", type=float, default=0.0,
                        help="limit JAX's GPU memory pool to this many GB (0: no cap)")
    parser.add_argument(
        "--search", default="",
        help="comma-separated batch sizes: report which fit under each remat "
        "policy of --search_remat (compile only), then exit")
    parser.add_argument("--search_remat", default="none,dots_no_batch,dots,full")
    parser.add_argument("--peak_tflops", type=float, default=989.0)
    return parser.parse_args()


def set_memory_cap(cap_gb):
    """Sets XLA_PYTHON_CLIENT_MEM_FRACTION for a cap in GB; must run before JAX starts."""
    try:
        out = subprocess.run([
            "nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,"
            "nounits", "-i", "0"
        ], check=True, capture_output=True, text=True)
        total_gb = float(out.stdout.split()[0]) * 2**20 / 1e9  # MiB -> GB
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        print("no nvidia-smi: --cap_gb ignored", file=sys.stderr)
        return None
    fraction = min(cap_gb / total_gb, 1.0)
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{fraction:.4f}"
    return fraction


def step_flops(config, batch, length, answer, target):
    """Model FLOPs of one train step (see the module docstring)."""
    c = config
    d, h, kv, hd, inter = (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                           c.intermediate_size)
    shapes = dict(q=(d, h * hd), k=(d, kv * hd), v=(d, kv * hd), o=(h * hd, d), gate=(d, inter),
                  up=(d, inter), down=(inter, d))
    dense = sum(i * o for i, o in shapes.values())  # Per layer.
    lora = 0
    if c.lora is not None:
        lora = sum((i + o) * c.lora.rank for t, (i, o) in shapes.items() if t in c.lora.targets)

    def tower(tokens_per_row, rows):
        tokens = tokens_per_row * rows
        linear = c.num_layers * tokens * (2 * dense + 2 * dense + 6 * lora)
        # Causal scores and weighted values: 2 matmuls of 2·hd FLOPs over ~S/2 keys per query.
        attention_fwd = c.num_layers * rows * h * hd * 2 * 2 * tokens_per_row**2 / 2
        return linear + 3 * attention_fwd

    logits = batch * answer * 2 * d * c.vocab_size * 2  # Forward and input gradient.
    return tower(length, batch) + tower(target, batch) + logits


def synthetic_batch(rng, config, batch, length, answer, target, first_new, num_items):
    """A batch with the trainer's keys and shapes: prompts full length, 30 placeholders each."""
    import numpy as np

    slots = 30
    tokens = rng.integers(3, first_new, (batch, length)).astype(np.int32)
    placeholder_mask = np.zeros((batch, length), bool)
    positions = np.linspace(8, length - answer - 8, slots).astype(int)
    placeholder_mask[:, positions] = True
    tokens[:, positions] = first_new + 1  # The [ItemEmb] placeholder token.
    history_mask = np.zeros((batch, length), bool)
    history_mask[:, 8:positions[10]] = True
    answer_mask = np.zeros((batch, length), bool)
    answer_mask[:, length - answer:length - 1] = True
    nip_positions = np.broadcast_to(np.arange(length - answer - 1, length - 1),
                                    (batch, answer)).astype(np.int32)
    target_tokens = rng.integers(3, first_new, (batch, target)).astype(np.int32)
    target_placeholder_mask = np.zeros((batch, target), bool)
    target_placeholder_mask[:, target - 1] = True
    target_pool_mask = np.ones((batch, target), bool)
    target_pool_mask[:, 0] = False
    items = rng.integers(1, num_items + 1, batch).astype(np.int32)
    return dict(tokens=tokens, attention_mask=np.ones((batch, length),
                                                      bool), nip_positions=nip_positions,
                nip_labels=np.take_along_axis(tokens, np.minimum(nip_positions + 1, length - 1),
                                              1), nip_mask=np.ones((batch, answer),
                                                                   bool), answer_mask=answer_mask,
                history_mask=history_mask, placeholder_mask=placeholder_mask,
                placeholder_items=rng.integers(1, num_items + 1, (batch, slots)).astype(np.int32),
                target_tokens=target_tokens, target_attention_mask=np.ones((batch, target), bool),
                target_pool_mask=target_pool_mask, target_placeholder_mask=target_placeholder_mask,
                target_placeholder_items=items[:, None], target_item=items,
                row_id=np.arange(batch, dtype=np.int64), example_mask=np.ones((batch, ), bool))


def main():
    args = parse_args()
    fraction = set_memory_cap(args.cap_gb) if args.cap_gb else None

    import jax
    import jax.numpy as jnp
    import numpy as np

    from configs import base
    from rsllm_jax.models import llama, lora as lora_lib, rsllm
    from rsllm_jax.parallel import mesh as mesh_lib
    from rsllm_jax.training import optim, train_step as train_step_lib

    num_items, num_new = 4606, 2  # LastFM's catalogue; hybrid adds [DSR] and [ItemEmb].
    base_config = llama.get_config(args.model, dtype="bfloat16", param_dtype="bfloat16",
                                   scan_layers=bool(args.scan_layers),
                                   attention_impl=args.attention_impl)
    first_new = base_config.vocab_size
    # The real train config (every field make_optimizer reads), with this benchmark's values.
    train = base.get_config().train
    train.update(
        dict(learning_rate=1e-4, warmup_ratio=0.0, decay="constant", weight_decay=1e-3,
             grad_clip=1.0, accumulation_steps=1, gamma=0.3, beta=0.4, temperature=0.5,
             symmetric_infonce=False))
    optimizer = optim.make_optimizer(train, 1000)
    rng = np.random.default_rng(0)
    item_table = jnp.asarray(rng.normal(size=(num_items + 1, 64)).astype(np.float32))
    # The frozen base in bfloat16, created on the device (never materialised on the host).
    frozen = {
        "params": {
            "llm": mesh_lib.init_sharded(llama.Llama(base_config), jax.random.PRNGKey(0),
                                         jnp.ones((1, 1), jnp.int32))["params"]
        }
    }
    base_bytes = sum(x.nbytes for x in jax.tree.leaves(frozen))

    def build(batch, remat):
        """(model config, jitted step, state, device batch) for one batch size and policy."""
        # float32 parameter dtype for what trains: LoRA, projector, added rows. The base's
        # bfloat16 arrays are passed in as they are (Flax does not recast given params).
        config = base_config.replace(
            param_dtype="float32", remat_policy=remat,
            lora=lora_lib.LoraConfig(rank=8, alpha=32.0, dropout=args.lora_dropout))
        model = rsllm.RSLLM(config, num_new_tokens=num_new, first_new_token=first_new,
                            deterministic=args.lora_dropout == 0)
        host = synthetic_batch(rng, config, batch, args.length, args.answer, args.target, first_new,
                               num_items)
        device_batch = {k: jnp.asarray(v) for k, v in host.items()}
        trainable = mesh_lib.init_sharded(model, jax.random.PRNGKey(1), device_batch, item_table,
                                          collections=rsllm.TRAINABLE)
        state = train_step_lib.create_state(trainable, optimizer, 0)
        step = jax.jit(train_step_lib.make_train_step(model, optimizer, train), donate_argnums=0)
        # The step takes an update's micro-batches stacked: here one.
        return config, step, state, {k: v[None] for k, v in device_batch.items()}

    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    limit = stats.get("bytes_limit")
    print(f"device {device.device_kind} ({jax.default_backend()}), model {args.model}, base "
          f"{base_bytes / 1e9:.2f} GB bf16, memory pool "
          f"{'n/a' if limit is None else f'{limit / 1e9:.1f} GB'}"
          f"{'' if fraction is None else f' (cap {args.cap_gb} GB, fraction {fraction:.3f})'}")

    if args.search:
        print(f"fits (XLA estimate: arguments + temporaries + outputs, GB) at length "
              f"{args.length}; limit {'n/a' if limit is None else f'{limit / 1e9:.1f}'}")
        for remat in args.search_remat.split(","):
            for batch in (int(b) for b in args.search.split(",")):
                _, step, state, device_batch = build(batch, remat)
                try:
                    compiled = step.lower(state, frozen, device_batch, item_table).compile()
                    m = compiled.memory_analysis()
                    need = (m.argument_size_in_bytes + m.temp_size_in_bytes +
                            m.output_size_in_bytes - m.alias_size_in_bytes)
                    fits = "?" if limit is None else "yes" if need <= limit else "no"
                    print(f"  remat {remat:14s} batch {batch:3d}: {need / 1e9:7.2f} GB  "
                          f"fits {fits}")
                except Exception as e:  # noqa: BLE001 (compile-time OOM is reported, not fatal)
                    print(f"  remat {remat:14s} batch {batch:3d}: failed ({str(e)[:80]})")
                del state
        return

    config, step, state, device_batch = build(args.batch, args.remat)
    start = time.perf_counter()
    compiled = step.lower(state, frozen, device_batch, item_table).compile()
    compile_s = time.perf_counter() - start
    for _ in range(args.warmup):
        state, metrics = compiled(state, frozen, device_batch, item_table)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = compiled(state, frozen, device_batch, item_table)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / args.steps
    tokens = args.batch * (args.length + args.target)
    flops = step_flops(config, args.batch, args.length, args.answer, args.target)
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    print(f"batch {args.batch} x {args.length} (+ target {args.target}, answer {args.answer}), "
          f"remat {args.remat}, compile {compile_s:.1f} s, loss {float(metrics['total']):.3f}")
    achieved = flops / seconds
    print(f"  step {seconds * 1e3:.1f} ms  {tokens / seconds:.0f} tokens/s  "
          f"{achieved / 1e12:.4g} TFLOP/s  MFU {achieved / (args.peak_tflops * 1e12):.2%}"
          f"  peak memory {'n/a' if peak is None else f'{peak / 1e9:.2f} GB'}")


if __name__ == "__main__":
    main()
