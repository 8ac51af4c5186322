"""megatron_prune: convert, prune, reshard and recover LLaMA-family models on megatron-core."""

__version__ = "0.1.0"
