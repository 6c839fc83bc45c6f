"""Greedy (or sampled) continuation of a prompt with a Hugging Face or GGUF Llama.

  python -m rsllm_jax.generate --model PATH --prompt "Once upon a time" --max_new_tokens 32

PATH is a Hugging Face model directory or a `.gguf` file.
"""

import argparse

import jax

from rsllm_jax import compilation_cache
from rsllm_jax.checkpoint import gguf as gguf_ckpt
from rsllm_jax.checkpoint import hf as hf_ckpt
from rsllm_jax.models import decode, llama


def load(path: str, dtype: str = "float32"):
    """(model, variables, tokenizer) for an HF directory or a GGUF file."""
    overrides = dict(param_dtype=dtype, dtype=dtype)
    if path.endswith(".gguf"):
        config, params = gguf_ckpt.load_gguf(path, **overrides)
        tokenizer = gguf_ckpt.tokenizer_from_gguf(path)
    else:
        config, params = hf_ckpt.load_hf(path, **overrides)
        tokenizer = hf_ckpt.load_tokenizer(path)
    return llama.Llama(config), {"params": params}, tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF model directory or .gguf file")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt in the tokenizer's chat template")
    args = parser.parse_args(argv)
    compilation_cache.enable()

    model, variables, tokenizer = load(args.model, args.dtype)
    prompt = args.prompt
    if args.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                               tokenize=False, add_generation_prompt=True)
    [text] = decode.generate_text(
        model,
        variables,
        tokenizer,
        [prompt],
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        stop_strings=args.stop,
        rng=jax.random.key(args.seed),
    )
    print(text)


if __name__ == "__main__":
    from rsllm_jax import cli  # pylint: disable=g-import-not-at-top

    with cli.one_line_errors():
        main()
