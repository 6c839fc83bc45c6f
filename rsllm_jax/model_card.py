"""The model card (README.md) of an exported run: base, data, recipe, test metrics, files."""

import os

from rsllm_jax import run_folder, run_paths

# metrics/eval.json keys shown in the card, in order.
EVAL_ROWS = (
    ("HitRatio@1 (paper's rule)", "hit_ratio_at_1"),
    ("ValidRatio (paper's rule)", "valid_ratio"),
    ("HitRatio@1 (exact title)", "strict_hit_ratio_at_1"),
    ("HitRatio@1, decoding constrained to the candidates", "constrained_hit_ratio_at_1"),
    ("HitRatio@1 / @5, candidates ranked by likelihood", ("rank_hit_ratio_at_1",
                                                          "rank_hit_ratio_at_5")),
    ("NDCG@5 / @10, candidates ranked by likelihood", ("rank_ndcg_at_5", "rank_ndcg_at_10")),
    ("whole catalogue, recommender alone: HitRatio@10 / NDCG@10", ("catalogue_rec_hit_ratio_at_10",
                                                                   "catalogue_rec_ndcg_at_10")),
    ("whole catalogue, recommender top K re-ranked by the LLM: HitRatio@10 / NDCG@10",
     ("catalogue_rerank_hit_ratio_at_10", "catalogue_rerank_ndcg_at_10")),
)


def _numbers(metrics, keys):
    keys = (keys, ) if isinstance(keys, str) else keys
    values = [metrics.get(k) for k in keys]
    if any(not isinstance(v, (int, float)) for v in values):
        return None
    return " / ".join(f"{v:.4f}" for v in values)


def _metrics_section(workdir, stage):
    evaluation = run_folder.step_metrics(workdir, "eval")
    rec = run_folder.step_metrics(workdir, "rec")
    lines = []
    if evaluation:
        lines.append(f"Split `{evaluation.get('split')}`, {evaluation.get('n')} rows, each with "
                     "20 candidates (19 random negatives and the true next item), model "
                     f"`{evaluation.get('stage')}` on `{evaluation.get('item_format')}` prompts" +
                     (" (not the exported stage)" if evaluation.get("stage") != stage else "") +
                     ":")
        lines += ["", "| measure | value |", "|---|---:|"]
        for name, keys in EVAL_ROWS:
            value = _numbers(evaluation, keys)
            if value is not None:
                if "catalogue" in name:
                    name += f" (K = {evaluation.get('retrieve_k')})"
                lines.append(f"| {name} | {value} |")
    if rec and isinstance(rec.get("test"), dict):
        hr1 = rec["test"].get("hit_ratio_at_1")
        if isinstance(hr1, float):
            lines += [
                "", f"The recommender alone ({rec.get('model')}, {rec.get('loss')}): "
                f"test HitRatio@1 {hr1:.4f} on the same candidates."
            ]
    return lines or ["No evaluation in the run folder (run its `eval` step)."]


def model_card(config, workdir, summary):
    """The card's Markdown text; `summary` is the export's rsllm.json content."""
    m, t = config.model, config.train
    stages = [
        f"`{s}`: `{config[s].item_format}` prompts" +
        (f", at most {config[s].max_steps} steps"
         if config[s].max_steps else f", {config[s].epochs} epochs") +
        (f", curriculum from `{config[s].curriculum_from}`" if config[s].curriculum_from else "")
        for s in ("stage1", "stage2") if run_paths.metrics_path(workdir, s).exists()
    ]
    base = m.name if m.name not in ("tiny", "bench") else f"`{m.name}` (random init)"
    if config.pretrain.steps:
        base += f", then every parameter trained {config.pretrain.steps} steps (`pretrain`)"
    lines = [
        f"# RSLLM on {summary['dataset']}: {os.path.basename(str(m.name).rstrip('/'))}",
        "",
        "A sequential recommender: a Llama fine-tuned with LoRA on prompts that mix item titles "
        "with behavioural tokens (a conventional recommender's item embeddings projected into "
        "the LLM's input space), exported by rsllm_jax "
        f"(stage `{summary['stage']}`, `{summary['item_format']}` prompts).",
        "",
        "## Base",
        "",
        f"- {base}; vocabulary {summary['base_vocab_size']} grown to {summary['vocab_size']} "
        f"by the tokens training added (ids {summary['first_new_token']} on).",
        "",
        "## Data",
        "",
        f"- `{summary['dataset']}`: {summary['num_items']} items ({summary['domain']}), "
        "histories of up to "
        f"{summary['prompt']['max_history']} items, {summary['prompt']['num_candidates']} "
        "candidates per prompt.",
        "",
        "## Recipe",
        "",
        f"- Recommender `{config.rec.model}` (loss `{config.rec.loss}`), item embeddings of "
        f"width {summary['projector']['in_features']}, projector "
        f"{summary['projector']['in_features']} → {summary['projector']['out_features']} → "
        f"{summary['projector']['out_features']} (GELU).",
        f"- LoRA r {m.lora_rank}, α {m.lora_alpha}, dropout {m.lora_dropout}, on "
        f"{m.lora_targets}; learning rate {t.learning_rate}, batch {t.batch_size} × "
        f"{t.accumulation_steps} accumulation steps; L = L_NIP + {t.gamma}·L_I + {t.beta}·L_U "
        f"(τ {t.temperature}).",
        *[f"- {s}" for s in stages],
        "",
        "## Test metrics",
        "",
        *_metrics_section(workdir, summary["stage"]),
        "",
        "## Files",
        "",
        "- `hf/`: the LoRA merged into the base, with the new token rows and tokenizer "
        "(`transformers.AutoModelForCausalLM.from_pretrained`); its generation config never "
        "emits the added tokens.",
        f"- `peft/`: the LoRA adapter and the new rows (PEFT trainable tokens) on `"
        f"{summary['peft_base']}`; resize that base's vocabulary to {summary['vocab_size']} "
        "before `PeftModel.from_pretrained`.",
        "- `rsllm.safetensors`: `projector.*` (a `torch.nn.Sequential(Linear, GELU, Linear)`), "
        "`item_embeddings` (the recommender's table, one row per item id, the last row "
        "padding), `new_token_embeddings`.",
        "- `rsllm.json`: the prompt frame, item templates, added token ids and the catalogue "
        "(id → title).",
        "",
        "A hybrid prompt is the text of the templates; at every placeholder token "
        f"({', '.join(summary['placeholders']) or 'none in these formats'}) the input "
        "embedding is replaced by the projector applied to that item's row of "
        "`item_embeddings` (rsllm_jax's README, \"Using a trained model\", has the recipe). "
        "An answer's score is the log-softmax of its title's tokens and EOS over the first "
        f"{summary['first_new_token']} columns: the added tokens are never answers.",
        "",
    ]
    return "\n".join(lines)
