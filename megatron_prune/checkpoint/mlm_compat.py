"""Megatron-LM's side of a legacy `torch` checkpoint's `args`: what its code reads, and what its rank files hold.

Written (beside megatron_io.megatron_args): every field that Megatron-LM's `load_args_from_checkpoint`
(megatron/training/checkpointing.py) and `tools/checkpoint` (loader_base / loader_legacy / loader_core,
saver_base) read, under each spelling Megatron-LM has used. Megatron-LM's saver reads `sequence_parallel` and
`apply_query_key_layer_scaling` unconditionally (AttributeError without them) and copies every other checkpoint
field only when its own parser has a field of that name: the norm epsilon is `norm_epsilon` in older versions and
the TransformerConfig field `layernorm_epsilon` (CLI flag still `--norm-epsilon`) since core_v0.16.1, so both are
written, or its converter silently falls back to 1e-5.

Read: both epsilon spellings and llama3 rope scaling. The rank files' args are read with checkpoint.safe_pickle:
types Megatron-LM stores there that we do not import (megatron-core enums, `signal.Signals`, numpy RNG states, ...)
are inert `Opaque` values; `plain_args` drops them before args are written again (Megatron-LM reads its args with
torch's weights_only loader, which knows no Opaque).
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

from megatron_prune.checkpoint.safe_pickle import Opaque


def plain_args(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of `args` without the fields that hold inert values of types we did not import."""
    out = copy.copy(args)
    for name, value in list(vars(out).items()):
        if _holds_opaque(value):
            delattr(out, name)
    return out


def _holds_opaque(value: Any) -> bool:
    if isinstance(value, Opaque):
        return True
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(_holds_opaque(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_opaque(v) for v in value.values())
    return False


def megatron_lm_fields(norm_eps: float) -> dict[str, Any]:
    """Fields Megatron-LM reads that megatron_args does not otherwise write (values: what our shards are)."""
    return dict(
        layernorm_epsilon=norm_eps,            # the name since core_v0.16.1 (norm_epsilon: the older one)
        sequence_parallel=False,               # saver_base reads it unconditionally
        add_position_embedding=True,           # Megatron-LM's default; check_checkpoint_args compares it
        squared_relu=False, apply_layernorm_1p=False,
        num_experts=None, expert_model_parallel_size=1, num_layers_per_virtual_pipeline_stage=None,
        ckpt_format="torch",
    )


def norm_eps_from_args(a: argparse.Namespace, default: float = 1e-5) -> float:
    """The RMSNorm epsilon under either spelling; Megatron-LM's current name first."""
    for name in ("layernorm_epsilon", "norm_epsilon"):
        value = getattr(a, name, None)
        if value is not None:
            return float(value)
    return default


def rope_scaling_factor_from_args(a: argparse.Namespace) -> float | None:
    """Megatron-LM's llama3 rope scaling (`--use-rope-scaling --rope-scaling-factor F`): the factor, or None.
    Its other llama3 parameters are fixed in megatron-core (low 1, high 4, original 8192: RopeScaling's defaults)."""
    if not getattr(a, "use_rope_scaling", False):
        return None
    return float(getattr(a, "rope_scaling_factor", None) or 8.0)


def non_llama_settings(a: argparse.Namespace) -> list[str]:
    """Settings of a Megatron-LM checkpoint that a LLaMA export cannot represent (empty: a LLaMA model)."""
    wanted = {"normalization": "RMSNorm", "swiglu": True, "position_embedding_type": "rope",
              "add_bias_linear": False, "add_qkv_bias": False, "rotary_interleaved": False,
              "apply_layernorm_1p": False, "squared_relu": False}
    problems = []
    for name, want in wanted.items():
        if name == "add_bias_linear" and not hasattr(a, name) and hasattr(a, "disable_bias_linear"):
            got = not a.disable_bias_linear
        else:
            got = getattr(a, name, want)
        if got != want:
            problems.append(f"{name}={got!r} (LLaMA: {want!r})")
    if float(getattr(a, "rotary_percent", 1.0)) != 1.0:
        problems.append(f"rotary_percent={a.rotary_percent!r} (LLaMA: 1.0)")
    if getattr(a, "num_experts", None):
        problems.append(f"num_experts={a.num_experts!r} (LLaMA: dense)")
    return problems
