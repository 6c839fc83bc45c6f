"""A real SentencePiece tokenizer trained on a dataset's own text, for random-init models.

The demo and the tests run a tiny randomly initialised Llama without downloading anything; it
still needs a real tokenizer. This trains a Llama-style SentencePiece BPE model (byte
fallback, so any title can be written) on the catalogue's titles and the prompt wording, and
loads it as a transformers `LlamaTokenizer`.
"""

import os

from rsllm_jax.prompts import templates


def train_tokenizer(catalogue, directory, vocab_size=1000):
    """Trains (once) and loads the tokenizer in `directory`."""
    model_file = os.path.join(directory, "tokenizer.model")
    if not os.path.exists(model_file):
        import sentencepiece as spm

        os.makedirs(directory, exist_ok=True)
        head, middle, tail = templates.prompt_frame(catalogue.domain)
        sentences = [head + middle + tail] * 20 + [t for t in catalogue.titles if t.strip()]
        sentences += [", ".join(catalogue.titles[i:i + 10])
                      for i in range(0, catalogue.num_items, 10)]
        prefix = os.path.join(directory, "tokenizer")
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_prefix=prefix, vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1,
            eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2)
        os.remove(prefix + ".vocab")  # transformers reads only the model file.
    from transformers import LlamaTokenizer

    return LlamaTokenizer.from_pretrained(directory)
