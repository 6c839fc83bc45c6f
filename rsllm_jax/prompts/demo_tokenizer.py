"""A real SentencePiece tokenizer trained on a dataset's own text, for random-init models.

The demo and the tests run a tiny randomly initialised Llama without downloading anything; it
still needs a real tokenizer. This trains a Llama-style SentencePiece BPE model (byte
fallback, so any title can be written) on the catalogue's titles and the prompt wording, and
loads it as a transformers `LlamaTokenizer`.
"""

import atexit
import os
import shutil
import tempfile

from rsllm_jax import run_paths
from rsllm_jax.prompts import templates


def train_tokenizer(catalogue, directory, vocab_size=1000):
    """Trains (once) and loads the tokenizer in `directory`, a local folder or a URL.

    SentencePiece and transformers read and write local files only: a tokenizer kept in an
    object store is trained into, or read back from, a local copy that lives as long as the
    process (the loaded tokenizer may read its file again when it is saved).
    """
    directory = run_paths.as_path(directory)
    model_file = directory / "tokenizer.model"
    if run_paths.is_url(directory):
        local = tempfile.mkdtemp(prefix="rsllm_tokenizer_")
        atexit.register(shutil.rmtree, local, ignore_errors=True)
    else:
        local = os.fspath(directory)
    local_file = os.path.join(local, "tokenizer.model")
    if not model_file.exists():
        _train(catalogue, local, vocab_size)
        if run_paths.is_url(directory):
            with open(local_file, "rb") as f:
                model_file.write_bytes(f.read())
    elif run_paths.is_url(directory):
        with open(local_file, "wb") as f:
            f.write(model_file.read_bytes())
    from transformers import LlamaTokenizer

    return LlamaTokenizer.from_pretrained(local)


def _train(catalogue, directory, vocab_size):
    """A SentencePiece BPE model of the catalogue's titles and the prompt wording, written to
    `directory`/tokenizer.model."""
    import sentencepiece as spm

    os.makedirs(directory, exist_ok=True)
    head, middle, tail = templates.prompt_frame(catalogue.domain)
    sentences = [head + middle + tail] * 20 + [t for t in catalogue.titles if t.strip()]
    sentences += [", ".join(catalogue.titles[i:i + 10]) for i in range(0, catalogue.num_items, 10)]
    prefix = os.path.join(directory, "tokenizer")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_prefix=prefix,
                                   vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
                                   character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    os.remove(prefix + ".vocab")  # transformers reads only the model file.
