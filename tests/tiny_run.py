"""Shared helpers: one tiny finished run (every step, a few steps each) and a tiny GGUF base, for
the tests of the commands that use a trained model (export, recommend)."""

import json

import numpy as np

from configs import demo
from rsllm_jax import main


def tiny_config(**eval_overrides):
    """The demo's pipeline at the smallest sizes that still train: 30 items, one epoch of the
    recommender, 4 steps of stage 2 alone (stage 1's tokens stay in the vocabulary, untrained)
    without the contrastive towers, the eval step with the whole-catalogue ranking (K = 12)."""
    config = demo.get_config()
    config.jobs = "prepare,rec,stage2,eval"
    config.data.synthetic.num_users = 60
    config.data.synthetic.num_items = 30
    config.rec.max_epochs = 1
    config.rec.selection_draws = 1
    config.model.demo_vocab_size = 400
    config.pretrain.steps = 0
    config.prompts.length_buckets = "256,512"
    config.train.batch_size = 8
    config.train.learning_rate = 3e-3
    config.train.gamma = config.train.beta = 0.0
    config.stage2.init_from_stage1 = False
    config.stage2.max_steps = 4
    config.eval.batch_size = 4
    config.eval.max_new_tokens = 4
    config.eval.constrained = False
    config.eval.ranking = False
    config.eval.retrieve_k = 12
    for key, value in eval_overrides.items():
        config.eval[key] = value
    return config


def train_tiny_run(workdir):
    """Runs every step of `tiny_config` in `workdir`; returns (config, results)."""
    config = tiny_config()
    return config, main.run_pipeline(config, workdir)


GGUF_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")


def write_tiny_gguf(path, texts, vocab_size=400, seed=0):
    """A llama GGUF file with random float32 weights (untied head) and a byte-level BPE
    tokenizer trained on `texts`, written with the gguf package as llama.cpp's converter
    writes one (tokenizer.ggml.* metadata, blk.<i>.* tensors)."""
    import gguf
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator(
        texts,
        trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(GGUF_SPECIAL),
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = [
        m if isinstance(m, str) else " ".join(m)
        for m in json.loads(tokenizer.to_str())["model"]["merges"]
    ]
    d, ff, layers, heads, kv_heads = 64, 128, 2, 4, 2
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(2048)
    writer.add_embedding_length(d)
    writer.add_feed_forward_length(ff)
    writer.add_block_count(layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in GGUF_SPECIAL else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab["<|im_start|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_pad_token_id(vocab["<|endoftext|>"])
    writer.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(seed)
    normal = lambda *shape: (0.1 * rng.standard_normal(shape)).astype(np.float32)  # noqa: E731
    ones = lambda n: (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)  # noqa: E731
    v, head_dim = len(tokens), d // heads
    writer.add_tensor("token_embd.weight", normal(v, d))
    writer.add_tensor("output_norm.weight", ones(d))
    writer.add_tensor("output.weight", normal(v, d))
    for i in range(layers):  # (out, in), as Hugging Face stores them.
        for name, shape in (("attn_q", (heads * head_dim, d)), ("attn_k", (kv_heads * head_dim, d)),
                            ("attn_v", (kv_heads * head_dim, d)), ("attn_output", (d, d)),
                            ("ffn_gate", (ff, d)), ("ffn_up", (ff, d)), ("ffn_down", (d, ff))):
            writer.add_tensor(f"blk.{i}.{name}.weight", normal(*shape))
        writer.add_tensor(f"blk.{i}.attn_norm.weight", ones(d))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", ones(d))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)
