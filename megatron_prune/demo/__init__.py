"""The end-to-end demo (`make demo`): python -m megatron_prune.demo --help."""
