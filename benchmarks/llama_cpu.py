"""Ours (JAX/Flax) vs transformers + peft (PyTorch) on CPU: a LoRA training step and greedy decoding.

  python benchmarks/llama_cpu.py [--steps 5] [--batch 8] [--length 256] [--new_tokens 32]

Model: d 256, 4 layers, 4 heads, 2 KV heads, MLP 688, vocab 32,000 (random weights), float32.
Train step: next-token cross-entropy over the batch, backward w.r.t. LoRA (r 8, alpha 16, all
seven projections), one Adam update. Decoding: 8 prompts, 32 greedy tokens each.
Do not run with the simulated multi-device XLA flag.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from rsllm_jax.checkpoint import hf as hf_ckpt
from rsllm_jax.models import decode, llama, lora as lora_lib
from rsllm_jax.parallel import mesh as mesh_lib


def _time(fn, steps):
    fn()  # warm-up (compilation for JAX)
    fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def jax_train_step(config, params, lora, tokens):
    model = llama.Llama(config)
    optimizer = optax.adam(1e-4)
    state = {"lora": lora, "opt": optimizer.init(lora)}

    @jax.jit
    def step(lora, opt_state, tokens):

        def loss_fn(lora):
            logits = model.apply({"params": params, "lora": lora}, tokens[:, :-1]).logits
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(lora)
        updates, opt_state = optimizer.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    def run():
        state["lora"], state["opt"], loss = step(state["lora"], state["opt"], tokens)
        loss.block_until_ready()

    return run


def torch_train_step(hf_model, tokens):
    import peft  # pylint: disable=g-import-not-at-top

    targets = [f"{t}_proj" for t in lora_lib.TARGETS]
    model = peft.get_peft_model(
        hf_model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets))
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens = torch.as_tensor(tokens, dtype=torch.long)

    def run():
        optimizer.zero_grad()
        logits = model(input_ids=tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 tokens[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()

    return run


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--prompt_length", type=int, default=64)
    args = parser.parse_args()

    config = llama.get_config("bench", lora=lora_lib.LoraConfig(rank=8, alpha=16.0))
    variables = mesh_lib.init_sharded(llama.Llama(config), jax.random.key(0),
                                      jnp.ones((1, 1), jnp.int32))
    import transformers  # pylint: disable=g-import-not-at-top

    hf_model = transformers.LlamaForCausalLM(hf_ckpt.config_to_hf(config)).eval()
    hf_model.config._attn_implementation = "sdpa"
    # Same weights in both frameworks.
    state = {
        k: torch.from_numpy(v())
        for k, v in hf_ckpt.hf_tensors(config, variables["params"]).items()
    }
    hf_model.load_state_dict(state, strict=False)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, config.vocab_size, (args.batch, args.length + 1)).astype(np.int32)
    train_tokens = args.batch * args.length

    print(f"devices: {jax.devices()}  torch threads: {torch.get_num_threads()}")
    ours = _time(jax_train_step(config, variables["params"], variables["lora"], tokens), args.steps)
    theirs = _time(torch_train_step(hf_model, tokens), args.steps)
    print(f"LoRA train step, batch {args.batch} x {args.length}:")
    print(f"  ours (jax)            {ours * 1e3:8.1f} ms  {train_tokens / ours:10.0f} tokens/s")
    print(f"  transformers + peft   {theirs * 1e3:8.1f} ms  {train_tokens / theirs:10.0f} tokens/s")
    print(f"  ratio ours/reference (throughput) {theirs / ours:.2f}x")

    # Greedy decoding: prompts of different lengths, left-padded, no early stop.
    hf_model = transformers.LlamaForCausalLM(hf_ckpt.config_to_hf(config)).eval()
    hf_model.load_state_dict(state, strict=False)
    lengths = rng.integers(args.prompt_length // 2, args.prompt_length + 1, args.batch)
    prompts = [list(rng.integers(3, config.vocab_size, n)) for n in lengths]
    ptokens, pmask = decode.left_pad(prompts, pad_id=0)
    model = llama.Llama(config.replace(lora=None))
    params = {"params": variables["params"]}

    def ours_generate():
        decode.generate(model, params, ptokens, pmask,
                        max_new_tokens=args.new_tokens).tokens.block_until_ready()

    def hf_generate():
        with torch.no_grad():
            hf_model.generate(
                input_ids=torch.as_tensor(ptokens, dtype=torch.long),
                attention_mask=torch.as_tensor(pmask, dtype=torch.long),
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=0,
            )

    new_tokens = args.batch * args.new_tokens
    ours = _time(ours_generate, args.steps)
    theirs = _time(hf_generate, args.steps)
    print(
        f"Greedy generation, {args.batch} prompts x {args.new_tokens} new tokens (prompt {ptokens.shape[1]}):"
    )
    print(f"  ours (jax, KV cache)  {ours * 1e3:8.1f} ms  {new_tokens / ours:10.0f} tokens/s")
    print(f"  transformers generate {theirs * 1e3:8.1f} ms  {new_tokens / theirs:10.0f} tokens/s")
    print(f"  ratio ours/reference (throughput) {theirs / ours:.2f}x")


if __name__ == "__main__":
    main()
