"""The end-to-end demo (README's main job): python -m megatron_prune.demo --help."""
