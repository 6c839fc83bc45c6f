"""Where the behavioural pathway of a trained run carries (or loses) the recommender's signal.

  python benchmarks/behavior_probe.py --workdir RUN [--stage stage2] [--train_rows 1500]

For a finished run whose stage reads behavioural tokens (item format hybrid, behavior or
llara), on its own data, base, item table and trained parameters, prints:

  scale      the mean L2 norm of the projected item rows Proj(e) (fresh projector at the run's
             seed and trained), of the base vocabulary's token rows and of the added rows
  gradients  the gradient norm of the stage's loss with respect to the projector, the added
             rows and the LoRA factors, at the fresh and at the trained parameters (a few train
             batches), each also relative to the parameters' norm
  probes     linear probes that read one candidate's state and score it; softmax over the 20
             candidates of a row, trained on train rows, HitRatio@1 on the test rows:
               raw      the recommender's own rows: a bilinear form of (last history item,
                        candidate) embeddings, i.e. what the table can say linearly about
                        "this candidate follows that history"
               layer k  the LLM's residual stream at the candidate's behavioural token after
                        k decoder layers (0: the injected row itself)
             beside the run's test ranking HitRatio@1 (the LLM's own answer).

A raw probe far above the LLM's answer says the information is in the tokens; the layer
probes say how far into the network it travels; the scale and gradient figures say whether
the projector can move the rows at all.
"""

import argparse
import json
import os

import numpy as np


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a finished run folder")
    parser.add_argument("--stage", default="stage2")
    parser.add_argument("--train_rows", type=int, default=1500, help="rows the probes train on")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--probe_steps", type=int, default=400)
    return parser.parse_args()


def _config(workdir):
    import ml_collections

    with open(os.path.join(workdir, "config.json")) as f:
        return ml_collections.ConfigDict(json.load(f))


def softmax_probe(train_x, train_y, test_x, test_y, steps, seed=0):
    """A linear scorer w·x (+ b) over each row's candidates (rows, 20, d), trained with the
    softmax cross-entropy of the target candidate; HitRatio@1 on the test rows."""
    import jax
    import jax.numpy as jnp
    import optax

    mean, std = train_x.mean(axis=(0, 1)), train_x.std(axis=(0, 1)) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    params = dict(w=jnp.zeros(train_x.shape[-1]), b=jnp.zeros(()))
    optimizer = optax.adamw(1e-2, weight_decay=1e-3)
    state = optimizer.init(params)

    def loss_fn(p, x, y):
        scores = x @ p["w"] + p["b"]
        return optax.softmax_cross_entropy_with_integer_labels(scores, y).mean()

    @jax.jit
    def step(p, s, x, y):
        loss, g = jax.value_and_grad(loss_fn)(p, x, y)
        updates, s = optimizer.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, len(train_x), min(256, len(train_x)))
        params, state, _ = step(params, state, train_x[idx], train_y[idx])
    scores = np.asarray(test_x @ params["w"])
    return float((scores.argmax(axis=1) == test_y).mean())


def main():
    args = parse_args()
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from rsllm_jax.data.pipeline import BatchIterator
    from rsllm_jax.run_paths import data_dir
    from rsllm_jax.data.storage import PreparedDataset
    from rsllm_jax.evaluation.evaluate import Evaluator
    from rsllm_jax.models import rsllm
    from rsllm_jax.prompts import batching
    from rsllm_jax.training import train_step as train_step_lib

    config = _config(args.workdir)
    dataset = PreparedDataset(data_dir(config, args.workdir))
    ev = Evaluator.from_workdir(config, args.workdir, dataset, args.stage)
    table = np.asarray(ev.item_table)
    num_items = dataset.catalogue.num_items
    trained = {k: v for k, v in ev.variables.items() if k in rsllm.TRAINABLE}

    # --- scale ---------------------------------------------------------------------------
    example = ev.encoder.encode_batch(
        next(
            iter(
                BatchIterator(dataset, "train", args.batch, seed=0, process_index=0,
                              process_count=1))))
    slots = dataset.manifest["max_history"] + dataset.manifest["num_candidates"]
    batch = batching.collate(example, args.batch, 0, slots, ev.buckets)
    model = ev.model.clone(deterministic=True)
    fresh = nn.unbox({
        k: v
        for k, v in model.init(jax.random.PRNGKey(int(config.seed)), batch, table).items()
        if k in rsllm.TRAINABLE
    })
    if "lora" in trained:
        fresh["lora"] = jax.tree.map(jnp.asarray, fresh["lora"])
    projector = rsllm.Projector(ev.llm.config.hidden_size)

    def projected_norm(adapter):
        rows = projector.apply({rsllm.ADAPTER: adapter["projector"]}, table[:num_items])
        return float(jnp.linalg.norm(rows, axis=-1).mean())

    base_rows = np.asarray(ev.variables["params"]["llm"]["embed_tokens"]["embedding"],
                           np.float32)[:ev.first_new]
    print(f"run {args.workdir}, stage {args.stage}, item format {ev.item_format}")
    print("scale (mean L2 norm of rows):")
    print(f"  base token rows            {np.linalg.norm(base_rows, axis=-1).mean():8.3f}")
    print(
        f"  added token rows, trained  "
        f"{np.linalg.norm(np.asarray(trained['adapter']['new_token_embedding']), axis=-1).mean():8.3f}"
    )
    print(f"  recommender rows e         {np.linalg.norm(table[:num_items], axis=-1).mean():8.3f}")
    print(f"  Proj(e), fresh projector   {projected_norm(fresh['adapter']):8.3f}")
    print(f"  Proj(e), trained projector {projected_norm(trained['adapter']):8.3f}")

    # --- gradients -----------------------------------------------------------------------
    c = config.train
    with_towers = c.gamma > 0 or c.beta > 0
    loss_fn = jax.jit(
        jax.grad(lambda t, b: train_step_lib.make_loss_fn(model, c, with_towers)
                 (t, {"params": ev.variables["params"]}, b, table, jax.random.key(0))[0]))
    batches = []
    for i, rows in enumerate(
            BatchIterator(dataset, "train", args.batch, seed=1, process_index=0, process_count=1)):
        if i == 4:
            break
        batches.append(
            batching.collate(ev.encoder.encode_batch(rows), args.batch, 0, slots, ev.buckets))
    print("gradient norm of the loss (mean of 4 train batches) | relative to the parameters:")
    for name, params in (("fresh", fresh), ("trained", trained)):
        grads = [loss_fn(params, b) for b in batches]
        parts = {
            "projector": lambda t: t["adapter"]["projector"],
            "added rows": lambda t: t["adapter"]["new_token_embedding"],
            "LoRA": lambda t: t.get("lora", {})
        }
        cells = []
        for part, pick in parts.items():
            g = np.mean([float(optax_norm(pick(g))) for g in grads])
            p = float(optax_norm(pick(params)))
            cells.append(f"{part} {g:.3g} | {g / max(p, 1e-12):.2g}")
        print(f"  {name:8s} " + ";  ".join(cells))

    # --- probes --------------------------------------------------------------------------
    def layer_states(prompts):
        tokens, mask, embeddings = ev.prompt_arrays(prompts)
        _, captured = ev.llm.apply(
            ev.llm_variables, embeddings=embeddings, attention_mask=mask, compute_logits=False,
            capture_intermediates=lambda m, method: method == "__call__" and m.name is not None and
            m.name.startswith("layers_"), mutable=["intermediates"])
        inter = captured["intermediates"]
        layers = [np.asarray(embeddings)]
        layers += [
            np.asarray(inter[f"layers_{i}"]["__call__"][0][0])
            for i in range(ev.llm.config.num_layers)
        ]
        positions = []
        for i, p in enumerate(prompts):
            offset = tokens.shape[1] - p.prompt_length
            positions.append([offset + pos for pos, _ in p.placeholders[-20:]])
        positions = np.asarray(positions)
        rows = np.arange(len(prompts))[:, None]
        return [layer[rows, positions] for layer in layers]  # each (rows, 20, d)

    def collect(split, limit):
        feats, raw, labels = None, [], []
        for rows in BatchIterator(dataset, split, args.batch, seed=2, process_index=0,
                                  process_count=1):
            prompts = ev.encoder.encode_batch(rows)
            states = layer_states(prompts)
            feats = states if feats is None else [
                np.concatenate([a, b]) for a, b in zip(feats, states)
            ]
            real = np.asarray(rows["mask"], bool)
            for h, n, cands, target in zip(rows["history"][real], rows["history_len"][real],
                                           rows["candidates"][real], rows["target"][real]):
                last = table[h[n - 1]]
                raw.append(np.einsum("i,cj->cij", last, table[cands]).reshape(len(cands), -1))
                labels.append(int(np.flatnonzero(cands == target)[0]))
            if len(labels) >= limit:
                break
        return feats, np.asarray(raw), np.asarray(labels)

    train_feats, train_raw, train_y = collect("train", args.train_rows)
    test_feats, test_raw, test_y = collect("test", 10**9)
    print(f"probes: HitRatio@1 on {len(test_y)} test rows, trained on {len(train_y)} train rows "
          "(chance 0.05)")
    print(f"  raw bilinear (last history item × candidate) "
          f"{softmax_probe(train_raw, train_y, test_raw, test_y, args.probe_steps):.4f}")
    for k, (train_x, test_x) in enumerate(zip(train_feats, test_feats)):
        print(
            f"  layer {k}: {softmax_probe(train_x, train_y, test_x, test_y, args.probe_steps):.4f}")
    metrics_path = os.path.join(args.workdir, "metrics", "eval.json")
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            m = json.load(f)["metrics"]
        print(f"  the run's own ranking HitRatio@1: {m.get('rank_hit_ratio_at_1')}")


def optax_norm(tree):
    import optax

    return optax.tree.norm(tree)


if __name__ == "__main__":
    main()
