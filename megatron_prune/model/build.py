"""LlamaShape + parallel sizes -> TransformerConfig + layer spec -> megatron-core GPTModel; strict shard loading.

Knows nothing of pruning or checkpoint files: it takes a shape and a state dict.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_prune.errors import InputError
from megatron_prune.checkpoint.keys import to_local_names, to_te_names
from megatron_prune.config.shape import LlamaShape, check_rope_supported, torch_dtype


@dataclass(frozen=True)
class ModelOptions:
    """How to build the model, beyond its shape."""

    tp: int = 1
    pp: int = 1
    padded_vocab_size: int | None = None  # None: the shape's own vocab size
    dtype: str | None = None              # None: the shape's dtype
    use_te: bool = False                  # Transformer Engine spec (GPU only)
    sequence_parallel: bool = False
    seq_length: int | None = None         # max_sequence_length; defaults to the shape's max positions
    init_weights: bool = False            # random init (training from scratch); off when a shard is loaded


def te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def transformer_config(shape: LlamaShape, opts: ModelOptions):
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = torch_dtype(opts.dtype or shape.dtype)
    cuda = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.ffn_hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups,
        kv_channels=shape.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=shape.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        apply_query_key_layer_scaling=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=opts.tp,
        pipeline_model_parallel_size=opts.pp,
        sequence_parallel=opts.sequence_parallel and opts.tp > 1,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not cuda,
        perform_initialization=opts.init_weights,
    )


def layer_spec(opts: ModelOptions, config=None):
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if opts.use_te:
        if not te_available():
            raise InputError("--use-te asks for Transformer Engine, which needs CUDA and transformer_engine")
        return specs.get_gpt_layer_with_transformer_engine_spec()
    if opts.sequence_parallel and opts.tp > 1:
        from megatron_prune.model.sp_norm import sequence_parallel_local_spec

        return sequence_parallel_local_spec(config)
    return specs.get_gpt_layer_local_spec(normalization="RMSNorm")


def build_model(shape: LlamaShape, opts: ModelOptions, pre_process: bool | None = None,
                post_process: bool | None = None):
    """A GPTModel for this process's pipeline stage (stage flags default to megatron's parallel_state)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    check_rope_supported(shape)
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage()
    if post_process is None:
        post_process = ps.is_pipeline_last_stage()
    config = transformer_config(shape, opts)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(opts, config),
        vocab_size=opts.padded_vocab_size or shape.vocab_size,
        max_sequence_length=opts.seq_length or shape.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=shape.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(shape.rope_theta) if float(shape.rope_theta).is_integer() else shape.rope_theta,
        rope_scaling=shape.rope_scaling is not None,
        rope_scaling_factor=shape.rope_scaling.factor if shape.rope_scaling else 8.0,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


def load_shard(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], use_te: bool = False) -> None:
    """Load one rank's shard strictly: every parameter must be present and of the right shape;
    only `_extra_state` entries may be absent. Accepts local and TE key spellings."""
    sd = to_te_names(state_dict) if use_te else to_local_names(state_dict)
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd and not k.endswith("_extra_state")]
    unexpected = [k for k in sd if k not in expected]
    bad = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
           if k in sd and isinstance(v, torch.Tensor) and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unexpected or bad:
        raise InputError("checkpoint does not match the model: "
                         + "; ".join(filter(None, [f"missing {missing[:5]}" if missing else "",
                                                   f"unexpected {unexpected[:5]}" if unexpected else "",
                                                   f"shape mismatch {bad[:5]}" if bad else ""])))
    model.load_state_dict({k: v for k, v in sd.items() if not k.endswith("_extra_state") or v is not None},
                          strict=False)
