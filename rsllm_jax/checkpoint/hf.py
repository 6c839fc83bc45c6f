"""Hugging Face Llama checkpoints: import (sharded, lazy), merged export, PEFT adapter export.

Import reads safetensors through memory maps and hands each device only the slice it owns
(`jax.make_array_from_callback`), so a checkpoint is never materialised whole on one host.
Our kernels are HF weights transposed (and heads split out), so the conversion is a table of
names plus a transpose/reshape per tensor kind.
"""

import json
import os
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from rsllm_jax.models.llama import Llama, LlamaConfig, RopeScaling
from rsllm_jax.models.lora import LORA, LoraConfig
from rsllm_jax.parallel import mesh as mesh_lib

CONFIG_FILE = "config.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# (path inside a decoder layer, HF name inside `model.layers.{i}.`, kind, LoRA target)
LAYER_TENSORS = (
    (("input_layernorm", "scale"), "input_layernorm.weight", "same", None),
    (("post_attention_layernorm", "scale"), "post_attention_layernorm.weight", "same", None),
    (("self_attn", "q_proj", "kernel"), "self_attn.q_proj.weight", "heads_out", "q"),
    (("self_attn", "k_proj", "kernel"), "self_attn.k_proj.weight", "heads_out", "k"),
    (("self_attn", "v_proj", "kernel"), "self_attn.v_proj.weight", "heads_out", "v"),
    (("self_attn", "o_proj", "kernel"), "self_attn.o_proj.weight", "heads_in", "o"),
    (("mlp", "gate_proj", "kernel"), "mlp.gate_proj.weight", "linear", "gate"),
    (("mlp", "up_proj", "kernel"), "mlp.up_proj.weight", "linear", "up"),
    (("mlp", "down_proj", "kernel"), "mlp.down_proj.weight", "linear", "down"),
)
TOP_TENSORS = (
    (("embed_tokens", "embedding"), "model.embed_tokens.weight", "same"),
    (("norm", "scale"), "model.norm.weight", "same"),
    (("lm_head", "kernel"), "lm_head.weight", "linear"),
)

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}
_DTYPE_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_SUPPORTED_ARCH_FIELDS = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}

# ----------------------------------------------------------------------------- config


def config_from_hf(hf_config: Mapping, **overrides) -> LlamaConfig:
    """Our config from a `config.json` dict (transformers 4.x or 5.x); overrides win."""
    hf = dict(hf_config)
    model_type = hf.get("model_type", "llama")
    if model_type != "llama":
        raise ValueError(
            f"Unsupported model_type {model_type!r}: only 'llama' checkpoints are supported.")
    for field, supported in _SUPPORTED_ARCH_FIELDS.items():
        if field in hf and hf[field] != supported:
            raise ValueError(
                f"Unsupported config field {field}={hf[field]!r} (only {supported!r} is "
                "implemented).")
    # 5.x folds rope_theta and the scaling into `rope_parameters`; 4.x has them apart.
    rope = dict(hf.get("rope_parameters") or {})
    rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = dict(hf.get("rope_scaling") or rope)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    rope_scaling = None
    if rope_type != "default":
        fields = (
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        )
        rope_scaling = RopeScaling(rope_type=rope_type,
                                   **{k: scaling[k]
                                      for k in fields if k in scaling})
    heads = hf["num_attention_heads"]
    eos = hf.get("eos_token_id", 2)
    config = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or 0,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        initializer_range=hf.get("initializer_range", 0.02),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=hf.get("pad_token_id"),
    )
    config.update(overrides)
    return LlamaConfig(**config)


def config_to_hf(config: LlamaConfig, dtype: str | None = None):
    """A `transformers.LlamaConfig` for our config (4.x or 5.x field layout)."""
    import transformers  # pylint: disable=g-import-not-at-top

    rope = {"rope_type": "default"}
    if config.rope_scaling is not None:
        s = config.rope_scaling
        rope = {"rope_type": s.rope_type, "factor": s.factor}
        if s.rope_type == "llama3":
            rope.update(
                low_freq_factor=s.low_freq_factor,
                high_freq_factor=s.high_freq_factor,
                original_max_position_embeddings=s.original_max_position_embeddings,
            )
    eos = config.eos_token_id
    kwargs = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id,
        eos_token_id=list(eos) if isinstance(eos, tuple) else eos,
        pad_token_id=config.pad_token_id,
        architectures=["LlamaForCausalLM"],
    )
    dtype = dtype or config.param_dtype
    if int(transformers.__version__.split(".")[0]) >= 5:
        kwargs.update(rope_parameters=dict(rope, rope_theta=config.rope_theta), dtype=dtype)
    else:
        scaling = None if config.rope_scaling is None else rope
        kwargs.update(rope_theta=config.rope_theta, rope_scaling=scaling, torch_dtype=dtype)
    return transformers.LlamaConfig(**kwargs)


def read_config(path: str) -> dict:
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"No {CONFIG_FILE} in {path!r}: not a Hugging Face model directory.")
    with open(file) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- safetensors


def open_safetensors(file: str) -> dict[str, np.ndarray]:
    """Memory-mapped, read-only numpy views of every tensor in a .safetensors file."""
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    data = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + header_len) if header else None
    tensors = {}
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{file}: tensor {name} has unsupported dtype {info['dtype']}.")
        start, end = info["data_offsets"]
        tensors[name] = data[start:end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
    return tensors


def write_safetensors(file: str, tensors: Mapping[str, np.ndarray]):
    """Writes numpy arrays (float32/float16/bfloat16) as a .safetensors file."""
    header, offset = {}, 0
    for name, x in tensors.items():
        nbytes = x.size * x.dtype.itemsize
        header[name] = {
            "dtype": _DTYPE_NAMES[np.dtype(x.dtype)],
            "shape": list(x.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data section to 8 bytes
    with open(file, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for x in tensors.values():
            f.write(np.ascontiguousarray(x).tobytes())


def open_hf_weights(path: str) -> dict[str, np.ndarray]:
    """Lazy views of every weight in an HF directory (single file or sharded with an index)."""
    index_file = os.path.join(path, SAFE_INDEX)
    single = os.path.join(path, SAFE_WEIGHTS)
    if os.path.isfile(index_file):
        with open(index_file) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(single):
        files = [SAFE_WEIGHTS]
    else:
        raise FileNotFoundError(
            f"No {SAFE_WEIGHTS} or {SAFE_INDEX} in {path!r} (only safetensors weights are "
            "supported).")
    tensors = {}
    for name in files:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{SAFE_INDEX} lists {name}, which is missing from {path!r}.")
        tensors.update(open_safetensors(file))
    return tensors


# ----------------------------------------------------------------------------- layout


def _to_ours(x: np.ndarray, kind: str, config: LlamaConfig) -> np.ndarray:
    """HF (out, in) weight -> our kernel layout, as a view (no copy of the mapped data)."""
    if kind == "same":
        return x
    if kind == "linear":
        return x.T
    if kind == "heads_out":  # (heads*head_dim, embed) -> (embed, heads, head_dim)
        return x.reshape(-1, config.head_dim, x.shape[-1]).transpose(2, 0, 1)
    if kind == "heads_in":  # (embed, heads*head_dim) -> (heads, head_dim, embed)
        return x.reshape(x.shape[0], -1, config.head_dim).transpose(1, 2, 0)
    raise ValueError(kind)


def _to_hf(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "same":
        return x
    if kind == "linear":
        return x.T
    if kind == "heads_out":
        return x.reshape(x.shape[0], -1).T
    if kind == "heads_in":
        return x.reshape(-1, x.shape[-1]).T
    raise ValueError(kind)


def _layer_prefix(config: LlamaConfig, i: int) -> tuple:
    return ("layers", ) if config.scan_layers else (f"layers_{i}", )


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _param_sources(config: LlamaConfig) -> list[tuple[tuple, list[str], str]]:
    """(our param path, HF names (one per stacked layer, or one), kind) for every parameter."""
    sources = []
    for path, name, kind in TOP_TENSORS:
        if path[0] == "lm_head" and config.tie_word_embeddings:
            continue
        sources.append((path, [name], kind))
    for path, name, kind, _ in LAYER_TENSORS:
        names = [f"model.layers.{i}.{name}" for i in range(config.num_layers)]
        if config.scan_layers:
            sources.append((("layers", ) + path, names, kind))
        else:
            sources.extend(((f"layers_{i}", ) + path, [n], kind) for i, n in enumerate(names))
    return sources


def params_from_tensors(config: LlamaConfig, tensors: Mapping[str, np.ndarray], *, mesh=None,
                        rules="fsdp_tp") -> dict:
    """Builds our `params` tree from HF-named (out, in) arrays, each device reading only its shard.

    `tensors` may hold memory-mapped views: only the slices a device owns are read. Shapes are
    checked against the config, naming the offending tensor.
    """
    model = Llama(config)
    boxed = mesh_lib.abstract_variables(model, jnp.zeros((1, 1), jnp.int32))["params"]
    abstract = nn.unbox(boxed)
    if mesh is None:
        device = jax.local_devices()[0]
        shardings = jax.tree_util.tree_map(lambda _: jax.sharding.SingleDeviceSharding(device),
                                           abstract)
    else:
        shardings = mesh_lib.logical_shardings(boxed, mesh, rules)
    dtype = np.dtype(jnp.dtype(config.param_dtype))
    params = {}
    for path, names, kind in _param_sources(config):
        target = _get(abstract, path)
        stacked = config.scan_layers and path[0] == "layers"
        expected = _to_hf(np.empty(target.shape[1:] if stacked else target.shape, np.int8),
                          kind).shape
        views = []
        for name in names:
            if name not in tensors:
                raise KeyError(f"Checkpoint is missing tensor {name!r}.")
            if tuple(tensors[name].shape) != expected:
                raise ValueError(
                    f"Tensor {name!r} has shape {tuple(tensors[name].shape)}, but the config "
                    f"expects {expected}.")
            views.append(_to_ours(tensors[name], kind, config))

        def read(index, views=views, stacked=stacked):
            if stacked:
                layers = range(len(views))[index[0]]
                return np.stack([np.asarray(views[i][index[1:]], dtype) for i in layers])
            return np.asarray(views[0][index], dtype)

        _set(params, path, jax.make_array_from_callback(target.shape, _get(shardings, path), read))
    return params


def load_hf(path: str, *, mesh=None, rules="fsdp_tp", **overrides) -> tuple[LlamaConfig, dict]:
    """Reads an HF Llama directory into (config, params), sharded over `mesh` if given.

    `overrides` set LlamaConfig fields (e.g. `param_dtype`, `dtype`, `scan_layers`, `lora`).
    """
    config = config_from_hf(read_config(path), **overrides)
    params = params_from_tensors(config, open_hf_weights(path), mesh=mesh, rules=rules)
    return config, params


def load_tokenizer(path: str):
    """The tokenizer of an HF model directory (AutoTokenizer)."""
    import transformers  # pylint: disable=g-import-not-at-top

    return transformers.AutoTokenizer.from_pretrained(path)


# ----------------------------------------------------------------------------- export


def hf_tensors(config: LlamaConfig, params, dtype=None,
               lora=None) -> dict[str, Callable[[], np.ndarray]]:
    """HF name -> thunk producing that tensor as numpy (one tensor in host memory at a time).

    With `lora`, each adapted kernel is merged on the host as it is produced: W + (α/r)·A·B in
    float32. One tensor at a time, so the merged model never exists whole on a device, and the
    result does not depend on how the parameters were sharded.
    """
    dtype = np.dtype(jnp.dtype(dtype or config.param_dtype))
    out = {}

    def host(path, layer=None, tree=params):
        x = _get(tree, path)
        if layer is not None:
            x = x[layer]
        return mesh_lib.host_array(x)

    def merged(path, layer):
        kernel = host(path, layer)
        try:
            factors = _get(lora, path[:-1]) if lora is not None else None
        except KeyError:  # Not a LoRA target.
            factors = None
        if not factors:
            return kernel
        a, b = (host(path[:-1] + (k, ), layer, lora).astype(np.float32) for k in ("a", "b"))
        rank = a.shape[-1]
        delta = (a.reshape(-1, rank) @ b.reshape(rank, -1)).reshape(kernel.shape)
        return kernel.astype(np.float32) + np.float32(config.lora.scale) * delta

    for path, name, kind in TOP_TENSORS:
        if path[0] == "lm_head" and config.tie_word_embeddings:
            continue
        out[name] = lambda path=path, kind=kind: np.ascontiguousarray(_to_hf(host(path), kind),
                                                                      dtype)
    for i in range(config.num_layers):
        for path, name, kind, _ in LAYER_TENSORS:
            full = _layer_prefix(config, i) + path
            layer = i if config.scan_layers else None
            out[f"model.layers.{i}.{name}"] = lambda full=full, layer=layer, kind=kind: (
                np.ascontiguousarray(_to_hf(merged(full, layer), kind), dtype))
    return out


def _hf_shapes(config: LlamaConfig, params) -> dict[str, tuple]:
    shapes = {}
    for path, names, kind in _param_sources(config):
        shape = _get(params, path).shape
        if len(names) > 1 or (config.scan_layers and path[0] == "layers"):
            shape = shape[1:]
        for name in names:
            shapes[name] = _to_hf(np.empty(shape, np.int8), kind).shape
    return shapes


def save_hf(
    path: str,
    config: LlamaConfig,
    params,
    lora=None,
    *,
    tokenizer=None,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
):
    """Writes a transformers-loadable Llama directory; LoRA (if given) is merged on the host.

    Weights go to `model.safetensors`, or to `model-0000i-of-0000n.safetensors` plus an index
    when they exceed `max_shard_bytes`. `dtype` (default: the param dtype) is the saved dtype.
    """
    if lora is not None and config.lora is None:
        raise ValueError(
            "LoRA factors given but config.lora is None (need rank and alpha to merge).")
    dtype = dtype or config.param_dtype
    np_dtype = np.dtype(jnp.dtype(dtype))
    os.makedirs(path, exist_ok=True)
    thunks = hf_tensors(config, params, dtype, lora)
    shapes = _hf_shapes(config, params)
    # Plan the shards from shapes, then fill one shard at a time.
    shards, size = [[]], 0
    for name in thunks:
        nbytes = int(np.prod(shapes[name])) * np_dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    total = sum(int(np.prod(s)) for s in shapes.values()) * np_dtype.itemsize
    for stale in (SAFE_WEIGHTS, SAFE_INDEX):
        if os.path.exists(os.path.join(path, stale)):
            os.remove(os.path.join(path, stale))
    if len(shards) == 1:
        write_safetensors(os.path.join(path, SAFE_WEIGHTS), {n: thunks[n]() for n in shards[0]})
    else:
        weight_map = {}
        for i, names in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(os.path.join(path, file), {n: thunks[n]() for n in names})
            weight_map.update({n: file for n in names})
        with open(os.path.join(path, SAFE_INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    hf_config = config_to_hf(config, dtype)
    hf_config.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


# Where PEFT keeps the rows of tokens it trains (`trainable_token_indices`), per module.
PEFT_TOKEN_MODULES = {
    "embed_tokens": "base_model.model.model.embed_tokens",
    "lm_head": "base_model.model.lm_head",
}


def save_peft_adapter(
    path: str,
    config: LlamaConfig,
    lora,
    *,
    base_model_name_or_path: str | None = None,
    trainable_tokens: Mapping[str, tuple[list, np.ndarray]] | None = None,
):
    """Writes the LoRA factors as a PEFT adapter directory (`PeftModel.from_pretrained` loads it).

    `trainable_tokens` maps `embed_tokens` / `lm_head` to (token ids, their rows (n, embed)):
    PEFT's `trainable_token_indices`, whose rows replace the base's rows of those ids (the
    base's vocabulary must first be resized to hold them).
    """
    if config.lora is None:
        raise ValueError("config.lora is None: the model has no LoRA adapters to export.")
    lc: LoraConfig = config.lora
    tensors = {}
    for i in range(config.num_layers):
        for path_in_layer, name, _, target in LAYER_TENSORS:
            if target not in lc.targets:
                continue
            factors = _get(lora, _layer_prefix(config, i) + path_in_layer[:-1])
            a, b = (mesh_lib.host_array(factors[k]) for k in ("a", "b"))
            if config.scan_layers:
                a, b = a[i], b[i]
            module = f"base_model.model.model.layers.{i}.{name.removesuffix('.weight')}"
            # ours: a (in..., r), b (r, out...); peft: lora_A.weight (r, in), lora_B.weight (out, r).
            tensors[f"{module}.lora_A.weight"] = np.ascontiguousarray(
                a.reshape(-1, lc.rank).T, np.float32)
            tensors[f"{module}.lora_B.weight"] = np.ascontiguousarray(
                b.reshape(lc.rank, -1).T, np.float32)
    for module, (ids, rows) in (trainable_tokens or {}).items():
        rows = np.ascontiguousarray(rows, np.float32)
        if rows.shape != (len(ids), config.hidden_size):
            raise ValueError(f"{module}: {rows.shape} rows for {len(ids)} token ids of width "
                             f"{config.hidden_size}")
        tensors[f"{PEFT_TOKEN_MODULES[module]}.token_adapter.trainable_tokens_delta"] = rows
    os.makedirs(path, exist_ok=True)
    write_safetensors(os.path.join(path, ADAPTER_WEIGHTS), tensors)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lc.rank,
        "lora_alpha": lc.alpha,
        "lora_dropout": lc.dropout,
        "target_modules": sorted(f"{t}_proj" for t in lc.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }
    if trainable_tokens:
        adapter_config["trainable_token_indices"] = {
            module: [int(i) for i in ids]
            for module, (ids, _) in trainable_tokens.items()
        }
    with open(os.path.join(path, ADAPTER_CONFIG), "w") as f:
        json.dump(adapter_config, f, indent=2)


__all__ = [
    "LORA",
    "config_from_hf",
    "config_to_hf",
    "load_hf",
    "load_tokenizer",
    "open_hf_weights",
    "params_from_tensors",
    "save_hf",
    "save_peft_adapter",
]
