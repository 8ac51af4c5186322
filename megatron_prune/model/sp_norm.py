"""Sequence parallelism with megatron-core's local (non-Transformer-Engine) GPT spec.

megatron-core 0.16's local spec normalises with `WrappedTorchNorm`, which asserts `not config.sequence_parallel`.
Under sequence parallelism a norm sees only this TP rank's slice of the sequence: the normalisation itself is
per token (nothing to communicate), but the weight gradient is a partial sum over the local tokens. Marking the
weight `sequence_parallel = True` (as megatron's TE and fused norms do) makes `finalize_model_grads` all-reduce
it over the TP group, so training with and without SP gives the same gradients and losses.

The final norm of the decoder is not part of the layer spec: megatron takes it from the block spec, so this
module builds a whole `TransformerBlockSubmodules`, which needs the config (layers in this pipeline stage).
"""

from __future__ import annotations

import dataclasses

import torch


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm (as WrappedTorchNorm builds it) whose weight gradient is all-reduced over TP under SP."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused) -> None:
        super().__init__(normalized_shape=hidden_size, eps=eps)
        # Read by megatron's finalize_model_grads (_allreduce_non_tensor_model_parallel_grads).
        self.weight.sequence_parallel = bool(config.sequence_parallel)


def sequence_parallel_layer_spec():
    """megatron-core's local GPT layer spec (RMSNorm) with SP-aware input and pre-MLP norms."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    sub = dataclasses.replace(spec.submodules, input_layernorm=SequenceParallelRMSNorm,
                              pre_mlp_layernorm=SequenceParallelRMSNorm)
    return dataclasses.replace(spec, submodules=sub)


def sequence_parallel_local_spec(config=None, vp_stage: int | None = None, pp_rank: int | None = None):
    """Block spec for GPTModel(transformer_layer_spec=...): SP-aware layer norms and final norm.

    `config` is the model's TransformerConfig (it fixes how many layers this pipeline stage builds)."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    if config is None:
        raise TypeError("sequence_parallel_local_spec(config) needs the model's TransformerConfig: the decoder's "
                        "final norm comes from the block spec (megatron_prune.model.build.layer_spec must pass it)")
    layer = sequence_parallel_layer_spec()
    n = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=SequenceParallelRMSNorm)
