"""Exports a trained run: a Hugging Face Llama, a PEFT adapter, and what makes it RSLLM.

  python -m rsllm_jax.export --workdir runs/lastfm --out exported/lastfm \
      [--stage stage2] [--dtype bfloat16] [--mesh fsdp8]

writes into `--out` (a new or empty folder):
  hf/               the LoRA merged into the base, the vocabulary grown by the tokens training
                    added ([DSR], [IID<n>], placeholders) with their trained rows, the tokenizer
                    with those tokens (and its chat template), a generation config that never
                    generates them (as our decoding never does): `from_pretrained` loads it, and
                    so does `--config.model.name=<out>/hf` here;
  peft/             the LoRA factors as a PEFT adapter on the original base, the new rows as
                    PEFT trainable tokens (resize the base's vocabulary first), the tokenizer;
  base/             the original base as a Hugging Face directory, when it is not one already
                    (a preset, a GGUF file, or the run's `pretrain` step): what peft/ adapts;
  rsllm.safetensors the projector (as `torch.nn.Sequential(Linear, GELU, Linear)` weights under
                    `projector.`), the recommender's item table and the new token rows;
  rsllm.json        item formats, prompt templates, token ids and the catalogue (id -> title):
                    enough to rebuild the prompts, hybrid ones included (README: the recipe);
  README.md         a model card: base, data, recipe, test metrics.

Everything is written to a temporary sibling folder renamed to `--out` at the end: a failed
export leaves nothing behind, and an existing non-empty `--out` is refused before any work.
The base is read into the run's mesh (`config.mesh`, or `--mesh`), so a model that does not
fit one device exports from its shards, one tensor in host memory at a time.
"""

import argparse
import json
import os
import shutil

from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from rsllm_jax import compilation_cache, model_card, run_folder, run_paths
from rsllm_jax.checkpoint import hf
from rsllm_jax.data.storage import PreparedDataset
from rsllm_jax.models import base, llama, rsllm
from rsllm_jax.parallel import layouts, mesh as mesh_lib
from rsllm_jax.prompts import encoding, stages, templates
from rsllm_jax.recommenders import load_item_embeddings

FORMAT = "rsllm_jax.export.v1"
RSLLM_WEIGHTS = "rsllm.safetensors"
RSLLM_CONFIG = "rsllm.json"


class ExportError(ValueError):
    """The export cannot start: bad arguments or an unusable run folder."""


def check_output(out):
    """Refuses an output path that exists and is not an empty folder."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ExportError(f"{out} exists and is not an empty folder; export writes only into a "
                          "new or empty folder (nothing was written)")


# --- the pieces -------------------------------------------------------------------------------


def item_templates(item_format, iid_tokens):
    """{role: Python format string with {title} and {id}} of one item format, e.g.
    {"history": " {title}[DSR][ItemEmb]", ...}: an item's text exactly as prompts write it."""
    out = {}
    for role in ("history", "candidate", "target"):
        pieces = []
        for segment in templates.item_segments(item_format, "{id}", "{title}", role, iid_tokens):
            pieces.append(segment.text if isinstance(segment, templates.Text) else segment.token)
        out[role] = "".join(pieces)
    return out


def grow_vocabulary(llama_config, params, new_rows, first_new):
    """(config, params) with the embedding table (and an untied head) holding the new tokens'
    rows at ids first_new.. (host float32 arrays for the two resized tensors).

    New head rows of an untied model are the mean of the base head rows (the head never
    produced these tokens; the generation config suppresses them anyway). A tied head is the
    embedding table, new rows included.
    """
    num_new = new_rows.shape[0]
    vocab = max(llama_config.vocab_size, first_new + num_new)
    embed = mesh_lib.host_array(params["embed_tokens"]["embedding"]).astype(np.float32)
    grown = np.zeros((vocab, embed.shape[1]), np.float32)
    grown[:embed.shape[0]] = embed
    grown[first_new:first_new + num_new] = new_rows
    params = dict(params, embed_tokens={"embedding": grown})
    head_rows = None
    if not llama_config.tie_word_embeddings:
        kernel = mesh_lib.host_array(params["lm_head"]["kernel"]).astype(np.float32)
        head_rows = np.repeat(kernel.mean(axis=1, keepdims=True).T, num_new, axis=0)
        grown_head = np.zeros((kernel.shape[0], vocab), np.float32)
        grown_head[:, :kernel.shape[1]] = kernel
        grown_head[:, first_new:first_new + num_new] = head_rows.T
        params = dict(params, lm_head={"kernel": grown_head})
    return llama_config.replace(vocab_size=vocab), params, head_rows


def projector_tensors(adapter):
    """The projector as `torch.nn.Sequential(Linear(64, d), GELU(), Linear(d, d))` weights
    (torch's Linear stores (out, in): ours transposed)."""
    p = {k: np.asarray(v, np.float32) for k, v in adapter["projector"].items()}
    return {
        "projector.0.weight": p["w1"].T, "projector.0.bias": p["b1"],
        "projector.2.weight": p["w2"].T, "projector.2.bias": p["b2"]
    }


def _write_generation_config(path, llama_config, suppressed):
    import transformers  # pylint: disable=g-import-not-at-top

    eos = llama_config.eos_token_id
    transformers.GenerationConfig(bos_token_id=llama_config.bos_token_id,
                                  pad_token_id=llama_config.pad_token_id,
                                  eos_token_id=list(eos) if isinstance(eos, tuple) else eos,
                                  suppress_tokens=[int(i)
                                                   for i in suppressed]).save_pretrained(path)


def _base_reference(config):
    """The base as a Hugging Face directory or hub name PEFT can load, or None when it exists
    only inside the run (a preset, a GGUF file, the `pretrain` step's result)."""
    name = config.model.name
    if name in llama.CONFIGS or name.endswith(".gguf") or config.pretrain.steps > 0:
        return None
    return os.path.abspath(name) if os.path.isdir(name) else name


# --- the command ------------------------------------------------------------------------------


def export_run(workdir, out, stage=run_folder.AUTO, dtype=None, mesh=None):
    """Exports `stage` of the run in `workdir` to `out` (see the module docstring); returns a
    summary dict (also in rsllm.json)."""
    check_output(out)
    stage = run_folder.resolve_stage(workdir, stage)
    config = run_folder.set_mesh(run_folder.load_config(workdir, stage), mesh)
    dtype = dtype or config.model.param_dtype
    tmp = f"{os.path.abspath(out).rstrip(os.sep)}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        summary = _export(config, workdir, stage, dtype, tmp, os.path.abspath(out))
        if os.path.isdir(out):
            os.rmdir(out)  # Empty (checked): the finished export takes its place.
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _export(config, workdir, stage, dtype, tmp, out):
    dataset = PreparedDataset(run_paths.data_dir(config, workdir))
    catalogue = dataset.catalogue
    device_mesh, rules = layouts.mesh_from_config(config.mesh)
    llama_config, base_params, tokenizer = base.load_base_model(config, catalogue, workdir,
                                                                device_mesh, rules)
    peft_base = _base_reference(config)
    if peft_base is None:  # The base exists only in the run: write it, for peft/ to adapt.
        peft_base = os.path.join(out, "base")
        hf.save_hf(os.path.join(tmp, "base"), llama_config.replace(lora=None), base_params,
                   tokenizer=tokenizer, dtype=dtype)
    first_new = len(tokenizer)
    encoding.add_special_tokens(tokenizer, stages.item_formats(config), catalogue.num_items,
                                config.prompts.iid_tokens)
    num_new = len(tokenizer) - first_new
    new_ids = list(range(first_new, first_new + num_new))
    trainable = run_folder.restore_trainable(workdir, stage, NamedSharding(device_mesh, P()))
    adapter = trainable[rsllm.ADAPTER]

    # hf/: LoRA merged (tensor by tensor on the host), grown vocabulary, tokenizer, generation
    # config.
    new_rows = mesh_lib.host_array(adapter["new_token_embedding"])[:num_new]
    hf_config, hf_params, head_rows = grow_vocabulary(llama_config, base_params, new_rows,
                                                      first_new)
    hf_path = os.path.join(tmp, "hf")
    hf.save_hf(hf_path, hf_config, hf_params, trainable["lora"]["llm"], tokenizer=tokenizer,
               dtype=dtype)
    # Our decoding never emits the added tokens (nor padding rows of the base's table).
    _write_generation_config(hf_path, hf_config, range(first_new, hf_config.vocab_size))

    # peft/: the LoRA factors and the new rows as PEFT trainable tokens.
    tokens = {"embed_tokens": (new_ids, new_rows)}
    if head_rows is not None:
        tokens["lm_head"] = (new_ids, head_rows)
    hf.save_peft_adapter(os.path.join(tmp, "peft"), llama_config, trainable["lora"]["llm"],
                         base_model_name_or_path=peft_base,
                         trainable_tokens=tokens if num_new else None)
    tokenizer.save_pretrained(os.path.join(tmp, "peft"))

    # rsllm.safetensors: projector, item table, new rows.
    weights = projector_tensors(adapter)
    weights["new_token_embeddings"] = new_rows
    table_path = run_paths.item_table_path(config, workdir)
    table_meta = None
    if config.prompts.item_embeddings or table_path.exists():
        table, table_meta = load_item_embeddings(table_path, catalogue.num_items)
        weights["item_embeddings"] = np.asarray(table, np.float32)
    # else: a text-only run without the rec step, which has no behavioural tokens.
    hf.write_safetensors(os.path.join(tmp, RSLLM_WEIGHTS), weights)

    summary = _description(config, stage, dtype, dataset, tokenizer, llama_config, hf_config,
                           first_new, new_ids, peft_base, table_meta,
                           int(weights["projector.0.weight"].shape[1]))
    with open(os.path.join(tmp, RSLLM_CONFIG), "w", encoding="utf-8") as f:
        json.dump(summary, f, ensure_ascii=False, indent=1)
    with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card.model_card(config, workdir, summary))
    return summary


def _description(config, stage, dtype, dataset, tokenizer, llama_config, hf_config, first_new,
                 new_ids, peft_base, table_meta, item_dim):
    """rsllm.json: what a user needs to rebuild the prompts around the exported model."""
    catalogue = dataset.catalogue
    formats = stages.item_formats(config)
    added = dict(zip(tokenizer.convert_ids_to_tokens(new_ids), new_ids))
    iid = {n: added.get(templates.iid_token(n)) for n in (0, catalogue.num_items - 1)}
    iid_block = None not in iid.values() and iid[catalogue.num_items - 1] - iid[0] == \
        catalogue.num_items - 1
    return dict(
        format=FORMAT,
        stage=stage,
        item_format=config[stage].item_format,
        item_formats=formats,
        dtype=dtype,
        base_model=config.model.name,
        peft_base=peft_base,
        vocab_size=hf_config.vocab_size,
        base_vocab_size=llama_config.vocab_size,
        first_new_token=first_new,
        # The [IID<n>] tokens are one block: [IID<n>] = iid_first_token + n.
        added_tokens={t: i
                      for t, i in added.items() if not (iid_block and t.startswith("[IID"))},
        iid_first_token=iid[0] if iid_block else None,
        placeholders=_placeholders(formats),
        prompt=dict(
            frame=list(templates.prompt_frame(catalogue.domain)),
            item_separator=templates.ITEM_SEPARATOR, items={
                fmt: item_templates(fmt, config.prompts.iid_tokens)
                for fmt in dict.fromkeys(formats + ["text"])
            }, answer=("{title}" if config.prompts.chat_template else " {title}") +
            str(tokenizer.eos_token), chat_template=bool(config.prompts.chat_template),
            max_length=config.prompts.max_length, max_history=dataset.manifest["max_history"],
            num_candidates=dataset.manifest["num_candidates"]),
        projector=dict(in_features=item_dim, out_features=llama_config.hidden_size,
                       activation="gelu (exact, erf)"),
        recommender=table_meta
        and dict(model=table_meta.get("model"), source=table_meta.get("source")),
        dataset=dataset.name,
        domain=catalogue.domain,
        num_items=catalogue.num_items,
        pad_id=catalogue.pad_id,
        catalogue={str(i): title
                   for i, title in enumerate(catalogue.titles)})


def _placeholders(item_formats):
    """The placeholder tokens whose input embedding is Proj(e_item), per format."""
    out = []
    for fmt in item_formats:
        for role in ("history", "candidate"):
            for segment in templates.item_segments(fmt, 0, "", role):
                if isinstance(segment, templates.Placeholder) and segment.token not in out:
                    out.append(segment.token)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="the run folder (rsllm_jax.main's)")
    parser.add_argument("--out", required=True, help="a new or empty folder")
    parser.add_argument("--stage", default=run_folder.AUTO,
                        help="stage1 | stage2 | auto (the last finished stage)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="dtype of the written weights (default: config.model.param_dtype)")
    parser.add_argument(
        "--mesh", default="",
        help="device mesh to read the base into: a preset or data,fsdp,tensor "
        "(default: the run's config.mesh)")
    args = parser.parse_args(argv)
    compilation_cache.enable()
    try:
        summary = export_run(args.workdir, args.out, args.stage, args.dtype, args.mesh)
    except (ExportError, FileNotFoundError, ValueError) as e:
        parser.exit(2, f"export: error: {e}\n")
    print(f"exported {args.workdir} ({summary['stage']}, {summary['item_format']} prompts) to "
          f"{args.out}: hf/, peft/, {RSLLM_WEIGHTS}, {RSLLM_CONFIG}, README.md")


if __name__ == "__main__":
    main()
