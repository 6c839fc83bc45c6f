"""The paper's Table 3 statistics of a prepared dataset.

  python -m rsllm_jax.data.stats DIR

#sequences is the number of user sequences over all splits, #items the catalogue size,
#interactions the users' interactions (in full where the raw data is known — MovieLens,
synthetic —; from LLaRA's files: one per train prefix row, and for val/test the last 10
history items plus the target, a lower bound where histories were longer), and
sparsity 1 − interactions / (sequences × items). Counts are taken before the length filter, as
the paper counts raw data.
"""

import sys

import numpy as np

from rsllm_jax.data.storage import PreparedDataset


def dataset_stats(data_dir):
    """Table-3 statistics plus per-split row counts, as a dict."""
    dataset = PreparedDataset(data_dir)
    splits = dataset.manifest["splits"]
    sequences = sum(s["sequences"] for s in splits.values())
    interactions = sum(s["interactions"] for s in splits.values())
    num_items = dataset.catalogue.num_items
    seen = np.zeros(num_items + 1, bool)
    for split in dataset.splits:
        rows = dataset.read(split)
        seen[rows["history"].ravel()] = True
        seen[rows["target"]] = True
    return dict(dataset=dataset.name, sequences=sequences, items=num_items,
                items_with_interactions=int(seen[:num_items].sum()), interactions=interactions,
                sparsity=1.0 - interactions / (sequences * num_items),
                rows={split: splits[split]["rows"]
                      for split in dataset.splits})


def format_stats(stats):
    return "\n".join([
        f"dataset        {stats['dataset']}",
        f"# sequences    {stats['sequences']:,}",
        f"# items        {stats['items']:,} ({stats['items_with_interactions']:,} in the rows "
        "after the length filter)",
        f"# interactions {stats['interactions']:,}",
        f"sparsity       {100 * stats['sparsity']:.1f}%",
        "rows           " + ", ".join(f"{s} {n:,}" for s, n in stats["rows"].items()),
    ])


def main(argv):
    if len(argv) != 2:
        sys.exit("usage: python -m rsllm_jax.data.stats PREPARED_DIR")
    print(format_stats(dataset_stats(argv[1])))


if __name__ == "__main__":
    from rsllm_jax import cli  # pylint: disable=g-import-not-at-top

    with cli.one_line_errors():
        main(sys.argv)
