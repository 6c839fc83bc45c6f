"""The frozen base LLM of a run: config.model → (LlamaConfig with LoRA, parameters,
tokenizer), read straight into a mesh's shards, and the pre-trained base when the run has one."""

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from rsllm_jax import config_lists, run_paths
from rsllm_jax.models import llama, lora as lora_lib
from rsllm_jax.parallel import layouts, mesh as mesh_lib


def llama_overrides(model_config, **changes):
    """The LlamaConfig fields config.model sets on any base: compute and parameter dtypes,
    layer scan, remat policy and the LoRA adapters (`changes` replace some of them)."""
    m = model_config
    overrides = dict(
        dtype=m.dtype, param_dtype=m.param_dtype, scan_layers=m.scan_layers,
        remat_policy=m.remat_policy, lora=lora_lib.LoraConfig(
            rank=m.lora_rank, alpha=m.lora_alpha, dropout=m.lora_dropout,
            targets=config_lists.names(m.lora_targets, "config.model.lora_targets")))
    return dict(overrides, **changes)


def load_base_model(config, catalogue, workdir, mesh=None, rules="fsdp_tp", pretrained=True):
    """(LlamaConfig with LoRA, frozen Llama params, tokenizer) from config.model.

    config.model.name: a preset of `models.llama.CONFIGS` (random init, with a SentencePiece
    tokenizer trained on the dataset's text: no download), a `.gguf` file, or a Hugging Face
    Llama directory. With a `mesh` the parameters are created or read directly into their
    shards, after the layout is checked against the model and config.train.batch_size. With
    config.pretrain.steps > 0 (and `pretrained`) the parameters are those the `pretrain` step
    trained from that base.
    """

    def check(llama_config):
        if mesh is not None:
            layouts.validate_model(mesh, rules, llama_config, config.train.batch_size)

    m = config.model
    overrides = llama_overrides(m)
    if m.name in llama.CONFIGS:
        from rsllm_jax.prompts.demo_tokenizer import train_tokenizer

        tokenizer = train_tokenizer(catalogue,
                                    run_paths.as_path(workdir) / "tokenizer", m.demo_vocab_size)
        llama_config = llama.get_config(m.name, vocab_size=len(tokenizer),
                                        bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=0,
                                        **overrides)
        check(llama_config)
        base = llama.Llama(llama_config.replace(lora=None))
        params = mesh_lib.init_sharded(base, jax.random.PRNGKey(m.init_seed),
                                       jnp.ones((1, 1), jnp.int32), mesh=mesh,
                                       rules=rules)["params"]
    elif m.name.endswith(".gguf"):
        from rsllm_jax.checkpoint import gguf, hf

        name = run_paths.local_copy(m.name)  # A base in a bucket is read from a local copy.
        llama_config, tensors, _ = gguf.read_gguf(name, **overrides)
        check(llama_config)
        params = hf.params_from_tensors(llama_config, tensors, mesh=mesh, rules=rules)
        tokenizer = gguf.tokenizer_from_gguf(name)
    else:
        from rsllm_jax.checkpoint import hf

        name = run_paths.local_copy(m.name)
        llama_config = hf.config_from_hf(hf.read_config(name), **overrides)
        check(llama_config)
        params = hf.params_from_tensors(llama_config, hf.open_hf_weights(name), mesh=mesh,
                                        rules=rules)
        tokenizer = hf.load_tokenizer(name)
    if pretrained and config.pretrain.steps > 0:
        path = run_paths.pretrained_path(workdir)
        if not path.exists():
            raise FileNotFoundError(
                f"{path}: config.pretrain.steps={config.pretrain.steps} but the base has not "
                "been pre-trained in this workdir; run the pretrain step first (config.jobs) or "
                "set config.pretrain.steps=0")
        params = restore_like(path, params)  # Into the same shardings.
    return llama_config, params, tokenizer


def restore_like(path, like):
    """The orbax checkpoint at `path`, placed with the shardings of the arrays `like`."""
    return ocp.StandardCheckpointer().restore(path,
                                              jax.tree.map(ocp.utils.to_shape_dtype_struct, like))
