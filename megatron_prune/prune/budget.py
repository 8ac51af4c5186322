"""A pruning budget: the parameters and/or the inference memory a pruned model must fit, parsed from the CLI's
flags (--target-params, --target-memory-gb, --memory-seq-length, --memory-batch-size).

    budget = make_budget(source_shape, "50%", "0.25", seq_length=None, batch_size=1)

Memory is config.shape.inference_memory_bytes: weights + KV cache. Which shapes meet a budget is
search_space.search's question.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_prune.config.shape import GiB, LlamaShape, canonical_dtype, inference_memory_bytes
from megatron_prune.errors import UserError


class BudgetError(UserError, ValueError):
    """A parameter or memory budget that cannot be parsed or met (a ValueError too, like the other domain errors)."""


@dataclass(frozen=True)
class Budget:
    """What a candidate must meet. `params` alone: 95-100% of it. `memory` (bytes) alone: 95-100% of it. Both:
    95-100% of `params` and at most `memory` (the memory is then a ceiling, the parameters the target).
    Memory is config.shape.inference_memory_bytes: weights + the KV cache of `batch_size` x `seq_length` tokens."""
    params: int | None = None
    memory: int | None = None
    seq_length: int = 4096
    batch_size: int = 1
    dtype: str = "bf16"

    def __post_init__(self) -> None:
        if self.params is None and self.memory is None:
            raise BudgetError("give --target-params and/or --target-memory-gb")
        for name in ("params", "memory"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise BudgetError(f"the {name} budget must be positive, got {getattr(self, name)}")
        for name, flag in (("seq_length", "--memory-seq-length"), ("batch_size", "--memory-batch-size")):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise BudgetError(f"{flag} must be a positive integer, got {getattr(self, name)!r}")
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))

    def memory_of(self, shape) -> int:
        return inference_memory_bytes(shape, self.seq_length, self.batch_size, self.dtype)

    def memory_basis(self) -> str:
        return f"{self.dtype} weights + KV cache of {self.batch_size} x {self.seq_length} tokens"

    def describe(self) -> str:
        parts = [f"{self.params:,} params"] if self.params is not None else []
        if self.memory is not None:
            kind = "at most " if self.params is not None else ""
            parts.append(f"{kind}{self.memory / GiB:.4g} GiB ({self.memory_basis()})")
        return " and ".join(parts)

    def to_json(self) -> dict:
        return {"params": self.params, "memory_bytes": self.memory, "memory_seq_length": self.seq_length,
                "memory_batch_size": self.batch_size, "dtype": self.dtype}


def parse_budget(text: str | int, source_params: int) -> int:
    """'64047840', '6.4e7' (absolute) or '50%' (of the source's parameters) -> a parameter count."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) * source_params / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise BudgetError(f"--target-params {raw!r}: expected a parameter count (64047840, 6.4e7) or a "
                          f"percentage of the source's {source_params:,} (50%)") from None
    if not math.isfinite(value) or round(value) < 1:
        raise BudgetError(f"--target-params {raw!r} is not a positive parameter count")
    budget = round(value)
    if budget > source_params:
        raise BudgetError(f"--target-params {raw} = {budget:,} exceeds the source model's {source_params:,} "
                          f"parameters: pruning only removes")
    return budget


def parse_memory_gb(text: str | float) -> int:
    """'0.25' (GiB, 2^30 bytes) -> bytes."""
    raw = str(text).strip()
    try:
        value = float(raw)
    except ValueError:
        raise BudgetError(f"--target-memory-gb {raw!r}: expected a size in GiB (2^30 bytes), e.g. 0.25") from None
    if not math.isfinite(value) or round(value * GiB) < 1:
        raise BudgetError(f"--target-memory-gb {raw!r} is not a positive size in GiB")
    return round(value * GiB)


def make_budget(src: LlamaShape, target_params: str | int | None = None, target_memory_gb: str | float | None = None,
                seq_length: int | None = None, batch_size: int = 1) -> Budget:
    """The Budget of the CLI's flags. The KV cache's sequence length defaults to the source's
    max_position_embeddings: the longest context the checkpoint says it serves, so a model inside the budget fits
    at every length it supports (give --memory-seq-length for a shorter serving context)."""
    if target_params is None and target_memory_gb is None:
        raise BudgetError("give --target-params and/or --target-memory-gb")
    budget = Budget(params=None if target_params is None else parse_budget(target_params, src.num_params()),
                    memory=None if target_memory_gb is None else parse_memory_gb(target_memory_gb),
                    seq_length=src.max_position_embeddings if seq_length is None else seq_length,
                    batch_size=batch_size)
    if budget.params is None and budget.memory > budget.memory_of(src):
        raise BudgetError(f"--target-memory-gb {target_memory_gb} exceeds the source model's "
                          f"{budget.memory_of(src) / GiB:.4g} GiB ({budget.memory_basis()}): "
                          f"pruning only removes")
    return budget
