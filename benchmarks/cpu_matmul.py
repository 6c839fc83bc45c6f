"""XLA's CPU matrix products against torch's, at the shapes `eval` runs SmolLM2 at.

  python benchmarks/cpu_matmul.py [--rounds 3] [--xla_flags=--xla_cpu_use_onednn=true ...]

A stack of SmolLM2-135M's 30 MLP layers (576 → 1,536 → 576, SiLU between, random weights) at
1 row and 8 rows (a decoding step with 1 or 8 slots) and 1,792 rows (a prefill of 8 × 224
tokens), in float32 and bfloat16, jitted JAX against torch on the same shapes. Each XLA_FLAGS
variant runs in its own process (XLA reads the flags once) after the default. Prints the median
milliseconds of each and the ratio torch / ours (above 1: ours is faster). Run on an idle
machine.
"""

import argparse
import json
import os
import subprocess
import sys
import time

LAYERS, HIDDEN, MLP = 30, 576, 1536
ROWS = (1, 8, 1792)
DTYPES = ("float32", "bfloat16")


def loadavg():
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def median_ms(fn, rows, rounds):
    """Median over rounds of the mean milliseconds per call (calls per round by size)."""
    fn()
    calls = 3 if rows > 8 else 20
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e3)
    return sorted(times)[len(times) // 2]


def run_jax(rounds):
    """{dtype: {rows: ms}} of the jitted stack; XLA_FLAGS as this process got them."""
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top

    @jax.jit
    def stack(x, ups, downs):
        for up, down in zip(ups, downs):
            x = x + jnp.dot(jax.nn.silu(jnp.dot(x, up)), down)
        return x

    rng = np.random.default_rng(0)
    result = {}
    for dtype in DTYPES:
        ups = [jnp.asarray(rng.normal(0, 0.02, (HIDDEN, MLP)), dtype) for _ in range(LAYERS)]
        downs = [jnp.asarray(rng.normal(0, 0.02, (MLP, HIDDEN)), dtype) for _ in range(LAYERS)]
        result[dtype] = {}
        for rows in ROWS:
            x = jnp.asarray(rng.normal(size=(rows, HIDDEN)), dtype)
            result[dtype][rows] = median_ms(
                lambda: jax.block_until_ready(stack(x, ups, downs)),  # pylint: disable=cell-var-from-loop
                rows,
                rounds)
    return result


def run_torch(rounds):
    """{dtype: {rows: ms}} of the same stack in eager torch, its default threads."""
    import torch  # pylint: disable=g-import-not-at-top

    torch.manual_seed(0)
    result = {}
    for dtype in DTYPES:
        dt = getattr(torch, dtype)
        ups = [(torch.randn(HIDDEN, MLP) * 0.02).to(dt) for _ in range(LAYERS)]
        downs = [(torch.randn(MLP, HIDDEN) * 0.02).to(dt) for _ in range(LAYERS)]

        def stack(x, ups=ups, downs=downs):
            with torch.no_grad():
                for up, down in zip(ups, downs):
                    x = x + torch.nn.functional.silu(x @ up) @ down
            return x

        result[dtype] = {
            rows: median_ms(lambda x=torch.randn(rows, HIDDEN).to(dt): stack(x), rows, rounds)
            for rows in ROWS
        }
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--xla_flags", action="append", default=[],
        help="an XLA_FLAGS variant (repeatable; write --xla_flags=VALUE), run "
        "in its own process beside the default")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # One XLA_FLAGS variant: its numbers as JSON on the last line.
        print(json.dumps(run_jax(args.rounds)))
        return

    print(f"load average at start: {loadavg()}")
    variants = [""] + [flags for flags in args.xla_flags if flags]
    ours = {}
    for flags in variants:
        env = dict(os.environ, XLA_FLAGS=flags)
        done = subprocess.run([sys.executable, __file__, "--child", "--rounds",
                               str(args.rounds)], env=env, capture_output=True, text=True,
                              check=True)
        ours[flags] = {
            d: {int(r): ms
                for r, ms in v.items()}
            for d, v in json.loads(done.stdout.strip().splitlines()[-1]).items()
        }
    reference = run_torch(args.rounds)
    print(f"{LAYERS} MLP layers {HIDDEN} → {MLP} → {HIDDEN}; median ms of {args.rounds} rounds")
    print("| XLA_FLAGS | dtype | " + " | ".join(f"{r} rows: ours / torch (ratio)"
                                                for r in ROWS) + " |")
    print("|---|---|" + "---|" * len(ROWS))
    for flags, result in ours.items():
        for dtype in DTYPES:
            cells = [
                f"{result[dtype][r]:.1f} / {reference[dtype][r]:.1f} ms "
                f"({reference[dtype][r] / result[dtype][r]:.2f}×)" for r in ROWS
            ]
            print(f"| {flags or 'default'} | {dtype} | " + " | ".join(cells) + " |")
    print(f"load average at end: {loadavg()}")


if __name__ == "__main__":
    main()
