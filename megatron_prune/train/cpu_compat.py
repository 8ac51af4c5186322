"""Training-only CPU adaptations of megatron-core 0.16 (optimizer side). Never active when CUDA is present.

`megatron_prune.model.cpu_shims` covers the model and schedules. The optimizer adds one more GPU assumption:
it checks *legacy type strings* of parameters and gradients (measured on 0.16.1):
- `Float16OptimizerWithFloat16Params` and `DistributedOptimizer` sort parameters by
  `param.type() in ['torch.cuda.HalfTensor', 'torch.cuda.BFloat16Tensor']` / `== 'torch.cuda.FloatTensor'`
  and raise TypeError for anything else (so bf16/fp16 and the distributed optimizer fail at construction);
- `clip_grad_by_total_norm_fp32` asserts `param.grad.type() == 'torch.cuda.FloatTensor'` (so clipping fails).

`cuda_type_names()` makes `Tensor.type()` (no arguments) answer the CUDA spelling for CPU tensors, only inside
the `with` block, and only on a machine without CUDA. Wrap optimizer construction and the clipping call in it;
the numerics are untouched (the same torch ops run on CPU).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

_ORIGINAL_TYPE = torch.Tensor.type
# Built from the dtype, not by calling the original: torch dispatches Tensor.type through the active
# TorchFunctionMode, which would re-enter the patched attribute.
_LEGACY_NAMES = {torch.float32: "FloatTensor", torch.float16: "HalfTensor", torch.bfloat16: "BFloat16Tensor",
                 torch.float64: "DoubleTensor", torch.int64: "LongTensor", torch.int32: "IntTensor",
                 torch.int16: "ShortTensor", torch.int8: "CharTensor", torch.uint8: "ByteTensor",
                 torch.bool: "BoolTensor"}


def _cuda_spelled_type(self: torch.Tensor, dtype=None, non_blocking: bool = False, **kwargs):
    if dtype is None and not kwargs and self.device.type == "cpu" and self.dtype in _LEGACY_NAMES:
        return f"torch.cuda.{_LEGACY_NAMES[self.dtype]}"
    return _ORIGINAL_TYPE(self, dtype, non_blocking, **kwargs)


@contextlib.contextmanager
def cuda_type_names() -> Iterator[None]:
    """Inside the block, CPU tensors report CUDA legacy type names (no-op when CUDA is available)."""
    if torch.cuda.is_available():
        yield
        return
    torch.Tensor.type = _cuda_spelled_type
    try:
        yield
    finally:
        torch.Tensor.type = _ORIGINAL_TYPE


@contextlib.contextmanager
def torch_adam_fully_reshardable() -> Iterator[None]:
    """megatron-core 0.16's DistributedOptimizer loads its "fully_reshardable" state by copying every entry of a
    parameter's torch optimizer state from the checkpoint, but its own loader leaves out Adam's `step` (which
    torch's AdamW, the stand-in for apex/TE's Adam, keeps per parameter; load_state_dict sets it just before): a
    KeyError. Inside the block the copy skips entries the checkpoint does not carry. Only without apex/TE."""
    from megatron.core.optimizer import distrib_optimizer as do

    if getattr(do, "HAVE_APEX_OR_TE", True):
        yield
        return
    original = do.DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        for key, dst in {"param": main_param, **self.optimizer.state[main_param]}.items():
            if key in tensors:
                dst.copy_(tensors[key])

    do.DistributedOptimizer._set_main_param_and_optimizer_states = set_states
    try:
        yield
    finally:
        do.DistributedOptimizer._set_main_param_and_optimizer_states = original
