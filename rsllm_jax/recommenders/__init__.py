"""Conventional sequential recommenders (GRU4Rec, Caser, SASRec): the behaviour encoders whose
item embeddings become RSLLM's behavioural tokens.

  models      the Flax modules; `build_model(name, num_items)`
  train       losses, training with early stopping, evaluation, the pipeline's `rec` step
  embeddings  the item-embedding table handed to the LLM stages
"""

from rsllm_jax.recommenders.embeddings import load_item_embeddings, save_item_embeddings
from rsllm_jax.recommenders.models import MODELS, Caser, GRU4Rec, SASRec, build_model
