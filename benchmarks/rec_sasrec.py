"""Training throughput of SASRec on LastFM: our JAX step against a straightforward PyTorch one.

Both train the same architecture (LLaRA's SASRec: hidden 64, 10 positions, 1 block, 1 head,
dropout 0.1) with the same loss (BCE, true item vs one sampled negative), optimiser (Adam lr
1e-3, L2 1e-4 as LLaRA trained SASRec) and batches (256 rows of the prepared train split, the
same negatives), for a fixed number of steps after a warm-up. The PyTorch reference is
written the obvious way, as LLaRA/DROS do it: full catalogue logits, then gather the two scored
columns. Prints samples/s of both and the ratio.

  python benchmarks/rec_sasrec.py --data_dir PREPARED_LASTFM [--steps 200]

(a prepared folder: python -m rsllm_jax.data.prepare --dataset lastfm --source ... --out DIR)
"""

import argparse
import time

import jax
import torch
from torch import nn

from rsllm_jax.data.pipeline import BatchIterator
from rsllm_jax.data.storage import PreparedDataset
from rsllm_jax.recommenders import models, train


class TorchSASRec(nn.Module):
    """LLaRA's SASRec in PyTorch, the reference implementation."""

    def __init__(self, num_items, hidden=64, max_len=10, dropout=0.1):
        super().__init__()
        self.num_items, self.max_len, self.hidden = num_items, max_len, hidden
        self.item_embeddings = nn.Embedding(num_items + 1, hidden)
        self.positional_embeddings = nn.Embedding(max_len, hidden)
        self.ln_1, self.ln_2, self.ln_3 = (nn.LayerNorm(hidden) for _ in range(3))
        self.linear_q, self.linear_k, self.linear_v = (nn.Linear(hidden, hidden) for _ in range(3))
        self.w_1, self.w_2 = nn.Conv1d(hidden, hidden, 1), nn.Conv1d(hidden, hidden, 1)
        self.ffn_norm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)
        self.s_fc = nn.Linear(hidden, num_items)
        self.register_buffer("causal", torch.tril(torch.ones(max_len, max_len, dtype=torch.bool)))

    def forward(self, history, history_len):
        positions = torch.arange(self.max_len)
        valid = (positions[None, :] < history_len[:, None]).float().unsqueeze(-1)
        seq = self.dropout(self.item_embeddings(history) + self.positional_embeddings(positions))
        seq = seq * valid
        queries = self.ln_1(seq)
        q, k, v = self.linear_q(queries), self.linear_k(seq), self.linear_v(seq)
        logits = q @ k.transpose(1, 2) / self.hidden**0.5
        allowed = self.causal[None] & (valid[:, None, :, 0] > 0)
        weights = torch.softmax(logits.masked_fill(~allowed, -1e9), -1) * valid
        attended = self.dropout(weights) @ v + queries
        x = self.ln_2(attended)
        ffn = self.w_2(torch.relu(self.w_1(x.transpose(1, 2)))).transpose(1, 2)
        ffn = self.ln_3(self.ffn_norm(self.dropout(ffn) + x) * valid)
        state = ffn[torch.arange(len(history)), history_len - 1]
        return self.s_fc(state)


def make_batches(dataset, steps, batch_size, seed=0):
    """`steps` train batches (NumPy) with one BCE negative per row."""
    iterator = BatchIterator(dataset, "train", batch_size, seed=seed, in_memory=True,
                             process_index=0, process_count=1, drop_remainder=True)
    batches = []
    for _ in range(steps):
        epoch = iterator.epoch
        b = next(iterator)
        batches.append(
            dict(
                history=b["history"], history_len=b["history_len"], target=b["target"],
                mask=b["mask"], negative=train.sample_negatives(b["target"], b["row_id"],
                                                                dataset.catalogue.num_items, seed,
                                                                epoch)))
    return batches


def time_jax(num_items, batches, warmup):
    model = models.build_model("sasrec", num_items)
    optimizer = train.make_optimizer(1e-3, train.LLARA_WEIGHT_DECAY["sasrec"])
    step = train.make_train_step(model, "bce", optimizer)
    params = model.init(jax.random.key(0), batches[0]["history"][:1], batches[0]["history_len"][:1])
    opt_state = optimizer.init(params)
    key = jax.random.key(1)
    for i, batch in enumerate(batches):
        if i == warmup:
            jax.block_until_ready(params)
            start = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, batch, jax.random.fold_in(key, i))
    jax.block_until_ready(params)
    return time.perf_counter() - start, float(loss)


def time_torch(num_items, batches, warmup):
    torch.manual_seed(0)
    model = TorchSASRec(num_items)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    for i, b in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        history = torch.from_numpy(b["history"]).long()
        history_len = torch.from_numpy(b["history_len"]).long()
        scores = model(history, history_len)
        pos = scores.gather(1, torch.from_numpy(b["target"]).long()[:, None])
        neg = scores.gather(1, torch.from_numpy(b["negative"]).long()[:, None])
        loss = loss_fn(torch.cat([pos, neg]),
                       torch.cat([torch.ones_like(pos), torch.zeros_like(neg)]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start, loss.item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", required=True, help="prepared LastFM folder")
    parser.add_argument("--steps", type=int, default=200, help="timed steps")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--torch_threads", type=int, default=0,
                        help="torch.set_num_threads; 0 keeps PyTorch's default")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    dataset = PreparedDataset(args.data_dir)
    num_items = dataset.catalogue.num_items
    batches = make_batches(dataset, args.warmup + args.steps, args.batch_size)
    samples = args.steps * args.batch_size
    # PyTorch first: XLA's CPU thread pool, once started, competes with PyTorch's threads.
    torch_seconds, torch_loss = time_torch(num_items, batches, args.warmup)
    jax_seconds, jax_loss = time_jax(num_items, batches, args.warmup)
    print(f"SASRec, {dataset.name} ({num_items} items), batch {args.batch_size}, "
          f"{args.steps} steps after {args.warmup} warm-up, torch threads "
          f"{torch.get_num_threads()}")
    print(f"jax   {samples / jax_seconds:10.0f} samples/s  (final loss {jax_loss:.4f})")
    print(f"torch {samples / torch_seconds:10.0f} samples/s  (final loss {torch_loss:.4f})")
    print(f"ratio jax/torch: {torch_seconds / jax_seconds:.2f}x")


if __name__ == "__main__":
    main()
