"""RSLLM in JAX/Flax: recommendation systems as a new language in large models."""

__version__ = "0.1.0"
