"""Random stage-2 batches with the collated layout, for train-step tests."""

import numpy as np


def stage_batch(rng, rows, length, vocab, first_new, num_new, slots, num_items=20):
    """A collated-looking stage-2 batch: prompts with placeholders, answers, target tower."""
    placeholder = first_new + num_new - 1
    tokens = rng.integers(3, vocab, (rows, length)).astype(np.int32)
    lengths = rng.integers(length // 2, length + 1, rows)
    attention = np.arange(length)[None] < lengths[:, None]
    tokens[:, 0] = 1
    tokens[:, 3:9:2] = placeholder  # Three behavioural tokens per row.
    tokens[:, 4] = first_new  # A new text token ([DSR]-like).
    tokens = np.where(attention, tokens, 0)
    placeholder_mask = tokens == placeholder
    answer = 4
    nip_positions = (lengths[:, None] - answer - 1 + np.arange(answer)[None]).astype(np.int32)
    nip_labels = np.take_along_axis(tokens, nip_positions + 1, axis=1)
    span = np.zeros((rows, length), bool)
    span[np.arange(rows)[:, None], nip_positions + 1] = True
    history = np.zeros((rows, length), bool)
    history[:, 2:9] = True
    target_tokens = np.stack([np.array([1, placeholder, 7, 0])
                              for _ in range(rows)]).astype(np.int32)
    target_items = rng.integers(0, num_items, rows).astype(np.int32)
    return dict(tokens=tokens, attention_mask=attention, nip_positions=nip_positions,
                nip_labels=nip_labels, nip_mask=np.ones((rows, answer), bool), answer_mask=span,
                history_mask=history, placeholder_mask=placeholder_mask,
                placeholder_items=rng.integers(0, num_items, (rows, slots)).astype(np.int32),
                target_tokens=target_tokens, target_attention_mask=target_tokens > 0,
                target_pool_mask=(target_tokens > 0) & (np.arange(4)[None] > 0),
                target_placeholder_mask=target_tokens == placeholder,
                target_placeholder_items=target_items[:, None], target_item=target_items,
                row_id=np.arange(rows, dtype=np.int32), example_mask=np.ones(rows, bool))
