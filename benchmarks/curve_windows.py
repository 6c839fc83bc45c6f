"""A stage's training curves as means over windows of steps: where a loss breaks away.

  python benchmarks/curve_windows.py RUN/stage2 [RUN/stage1 ...] \
      [--keys train/nip,train/projector_norm] [--window 500]

Reads each stage folder's metrics.jsonl (one line per log interval, each value the interval's
mean: README, Watching a run) and prints, per key, the mean of the lines whose step falls in
(0, w], (w, 2w], ... A behavioural pathway switching on shows as the NIP loss leaving its
plateau (README, Results).
"""

import argparse
import json
import os

import numpy as np


def window_means(metrics_path, key, window):
    """[(last step of the window, mean of `key` over the window's log lines)] for the windows
    that have a line with `key`."""
    steps, values = [], []
    with open(metrics_path) as f:
        for line in f:
            record = json.loads(line)
            if key in record:
                steps.append(record["step"])
                values.append(record[key])
    steps, values = np.asarray(steps), np.asarray(values, np.float64)
    windows = (steps - 1) // window  # Step s lies in window (s - 1) // w: (0, w] is window 0.
    return [((w + 1) * window, float(values[windows == w].mean())) for w in np.unique(windows)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stage_dirs", nargs="+", help="folders holding a metrics.jsonl")
    parser.add_argument("--keys", default="train/nip", help="comma-separated metric names")
    parser.add_argument("--window", type=int, default=500, help="steps per window")
    args = parser.parse_args()
    for stage_dir in args.stage_dirs:
        for key in args.keys.split(","):
            means = window_means(os.path.join(stage_dir, "metrics.jsonl"), key, args.window)
            print(f"{stage_dir} {key}, means over {args.window} steps:",
                  " ".join(f"{mean:.3f}" for _, mean in means))


if __name__ == "__main__":
    main()
