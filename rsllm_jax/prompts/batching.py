"""Fixed-shape training batches from encoded prompts, padded to a few length buckets.

Shapes depend only on (batch size, bucket), so the jitted train step compiles once per bucket
instead of once per batch. Sequences are right-padded (training is causal and positions come
from the attention mask).

Arrays (B = batch size, S = length bucket, A = answer bucket, T = target bucket, P = the
placeholder slots of a prompt):
  tokens, attention_mask        (B, S)   the prompt and answer, [BOS] ... [EOS]
  nip_positions, nip_labels,    (B, A)   logits are needed only where the next token is an
  nip_mask                               answer token (Eq. 2): position p predicts label p + 1
  answer_mask                   (B, S)   the target title's tokens: g_UI pools over them
  history_mask                  (B, S)   the history items' tokens: g_U pools over them
  placeholder_mask              (B, S)   behavioural-token positions ...
  placeholder_items             (B, P)   ... and their item ids, k-th placeholder in slot k
  target_tokens,                (B, T)   tower T: the target item alone in the same format
  target_attention_mask, target_pool_mask, target_placeholder_mask; target_placeholder_items (B, 1)
  target_item, row_id,          (B,)     the target's item id (same-item rows are not
  example_mask                           InfoNCE negatives); False for padding rows
"""

import numpy as np

DEFAULT_LENGTH_BUCKETS = (128, 256, 384, 512, 768, 1024, 1536, 2048)
DEFAULT_ANSWER_BUCKETS = (16, 32, 64, 128)
DEFAULT_TARGET_BUCKETS = (16, 32, 64, 128)


def bucket_for(length, buckets, what):
    """The smallest bucket that holds `length`."""
    for bucket in sorted(buckets):
        if length <= bucket:
            return bucket
    raise ValueError(f"{what} of {length} tokens exceeds the largest bucket {max(buckets)}")


def collate(prompts, batch_size, pad_id, num_placeholder_slots,
            length_buckets=DEFAULT_LENGTH_BUCKETS, answer_buckets=DEFAULT_ANSWER_BUCKETS,
            target_buckets=DEFAULT_TARGET_BUCKETS):
    """Stacks up to `batch_size` EncodedPrompts into the arrays described above."""
    if len(prompts) > batch_size:
        raise ValueError(f"{len(prompts)} prompts do not fit a batch of {batch_size}")
    longest = max((len(p.tokens) for p in prompts), default=1)
    seq = bucket_for(longest, length_buckets, "a prompt")
    answer = bucket_for(max((len(p.tokens) - p.prompt_length for p in prompts), default=1),
                        answer_buckets, "an answer")
    target = bucket_for(max((len(p.target_tokens) for p in prompts), default=1), target_buckets,
                        "a target item")
    b = batch_size
    out = dict(
        tokens=np.full((b, seq), pad_id, np.int32),
        attention_mask=np.zeros((b, seq), bool),
        nip_positions=np.zeros((b, answer), np.int32),
        nip_labels=np.full((b, answer), pad_id, np.int32),
        nip_mask=np.zeros((b, answer), bool),
        answer_mask=np.zeros((b, seq), bool),
        history_mask=np.zeros((b, seq), bool),
        placeholder_mask=np.zeros((b, seq), bool),
        placeholder_items=np.zeros((b, num_placeholder_slots), np.int32),
        target_tokens=np.full((b, target), pad_id, np.int32),
        target_attention_mask=np.zeros((b, target), bool),
        target_pool_mask=np.zeros((b, target), bool),
        target_placeholder_mask=np.zeros((b, target), bool),
        target_placeholder_items=np.zeros((b, 1), np.int32),
        target_item=np.zeros((b, ), np.int32),
        row_id=np.full((b, ), -1, np.int64),
        example_mask=np.zeros((b, ), bool),
    )
    for i, p in enumerate(prompts):
        n = len(p.tokens)
        out["tokens"][i, :n] = p.tokens
        out["attention_mask"][i, :n] = True
        n_answer = n - p.prompt_length
        out["nip_positions"][i, :n_answer] = np.arange(p.prompt_length - 1, n - 1)
        out["nip_labels"][i, :n_answer] = p.tokens[p.prompt_length:]
        out["nip_mask"][i, :n_answer] = True
        out["answer_mask"][i, p.prompt_length:p.prompt_length + p.answer_title_length] = True
        for start, end in p.history_spans:
            out["history_mask"][i, start:end] = True
        if len(p.placeholders) > num_placeholder_slots:
            raise ValueError(f"row {p.row_id} has {len(p.placeholders)} placeholders, more "
                             f"than the {num_placeholder_slots} slots")
        for k, (position, item_id) in enumerate(p.placeholders):
            out["placeholder_mask"][i, position] = True
            out["placeholder_items"][i, k] = item_id
        t = len(p.target_tokens)
        out["target_tokens"][i, :t] = p.target_tokens
        out["target_attention_mask"][i, :t] = True
        # g_I pools over the item's own tokens, not the BOS before them.
        out["target_pool_mask"][i, p.target_item_start:t] = True
        for position, item_id in p.target_placeholders:
            out["target_placeholder_mask"][i, position] = True
            out["target_placeholder_items"][i, 0] = item_id
        out["target_item"][i] = p.target
        out["row_id"][i] = p.row_id
        out["example_mask"][i] = True
    return out


def stack(batches):
    """The micro-batches of one update as arrays (k, B, ...), each right-padded with collate's
    padding (zeros: pad id 0, masks False) to the largest bucket among them."""
    out = {}
    for key in batches[0]:
        arrays = [np.asarray(b[key]) for b in batches]
        shape = np.max([a.shape for a in arrays], axis=0)
        out[key] = np.stack(
            [np.pad(a, [(0, int(t) - s) for s, t in zip(a.shape, shape)]) for a in arrays])
    return out
