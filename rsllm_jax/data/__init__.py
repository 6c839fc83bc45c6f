"""Data layer: raw LLaRA-format files → our array_record datasets → batches.

Modules, in the order data flows through them:
  safe_pickle  restricted unpickler for LLaRA's pandas pickles (never plain pickle)
  catalogue    item id → title tables (id2name.txt, MovieLens u.item)
  sources      readers for LLaRA splits and raw MovieLens ratings; row validation
  synthetic    a generated dataset with learnable sequential structure (demo, tests)
  candidates   the 20-candidate sets (fixed for val/test, redrawn per epoch for train)
  storage      TFDS array_record builder, manifest, and the reader of a prepared folder
  prepare      the `prepare` step and its command line
  pipeline     deterministic, resumable, host-sharded batch iterator
  stats        the paper's Table 3 statistics of a prepared dataset
"""

from rsllm_jax.data.errors import DataError

__all__ = ["DataError"]
