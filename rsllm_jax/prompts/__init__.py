"""Prompts: templates and item formats → token ids with the spans the losses need.

  templates   the task text per domain and how one item is written in each item format
  encoding    special tokens, tokenization with spans and placeholders, the length policy
  batching    fixed-shape batches padded to a few length buckets
"""
