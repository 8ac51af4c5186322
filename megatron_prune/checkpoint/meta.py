"""CheckpointMeta: what `megatron_prune.json` records beside a Megatron checkpoint (shape, parallel sizes, vocab
padding, per-rank sizes of uneven shards, history). Pure data; checkpoint.megatron_io reads and writes it."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from megatron_prune.config.shape import LlamaShape


@dataclass(frozen=True)
class CheckpointMeta:
    shape: LlamaShape
    tp: int
    pp: int
    padded_vocab_size: int
    make_vocab_size_divisible_by: int = 128
    te_names: bool = False
    hf_config: dict = field(default_factory=dict)
    history: tuple = ()
    # Uneven shards (global-mode pruning): {"groups": [[g_rank0, g_rank1, ...] per layer], "ffn": [[...] per layer]}
    # (heads per group are equal everywhere); None when every rank holds the same sizes.
    rank_sizes: dict | None = None

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.update(format=1, shape=self.shape.to_dict(), dtype=self.shape.dtype, history=list(self.history))
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "CheckpointMeta":
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["shape"] = LlamaShape.from_dict(d["shape"])
        kw["history"] = tuple(d.get("history", ()))
        return cls(**kw)

    def with_history(self, op: str, **details: Any) -> "CheckpointMeta":
        entry = {"op": op, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **details}
        return dataclasses.replace(self, history=(*self.history, entry))

    def replace(self, **changes: Any) -> "CheckpointMeta":
        return dataclasses.replace(self, **changes)

    def at(self, tp: int, pp: int) -> "CheckpointMeta":
        """The same model at other parallel sizes (how a torch_dist checkpoint, whose tensors do not depend on them,
        is read): the padded vocabulary is kept when it splits over `tp`, else padded again for it (rows past the
        vocabulary are padding)."""
        if (tp, pp) == (self.tp, self.pp):
            return self
        padded = self.padded_vocab_size
        if padded % tp:
            padded = self.shape.padded_vocab(self.make_vocab_size_divisible_by, tp)
        self.shape.check_parallel(tp, pp, padded)
        return self.replace(tp=tp, pp=pp, padded_vocab_size=padded)
