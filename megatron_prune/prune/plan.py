"""PrunePlan: which channels, heads, groups and layers of a LLaMA model survive, in GLOBAL indices of the source
model, independent of TP/PP. One JSON file (`prune_plan.json`) that both the distributed Megatron pruner and
the single-process HF pruner apply, so the two paths check each other.

Indices are sorted ascending everywhere: kept channels keep their relative order, so the TP shards of a pruned
tensor concatenate (rank by rank) to exactly the HF-side pruned tensor, even when shards are uneven.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from megatron_prune.checkpoint.atomic import atomic_write_text
from megatron_prune.checkpoint.layout import kept_per_rank
from megatron_prune.config.shape import LlamaShape
from megatron_prune.errors import UserError

SCHEMA_VERSION = 1
KIND = "megatron_prune.prune_plan"
MODES = ("balance", "global")
# How units are scored (--importance), cheapest first: the data-free ones, then the two that run the model on
# calibration tokens (prune.scoring.MODEL_METHODS). The one list: argparse, PruneConfig and plan_for use it.
IMPORTANCES = ("random", "magnitude", "activation", "taylor")
METHODS = IMPORTANCES + ("manual",)  # what a plan may record: "manual", a plan made from scores given by hand
# Shape fields a plan must agree on with a checkpoint (dtype, rope and eps do not change what is sliced).
STRUCTURE = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
             "kv_channels", "vocab_size", "tie_word_embeddings")


class PlanError(UserError, ValueError):
    """A plan that is inconsistent, or that does not fit a checkpoint / TP size; the message names every factor."""


def _check_indices(name: str, idx: Sequence[int], n: int, count: int) -> None:
    if len(idx) != count:
        raise PlanError(f"{name}: {len(idx)} indices kept, the target shape needs {count}")
    if any(not isinstance(i, int) or i < 0 or i >= n for i in idx):
        raise PlanError(f"{name}: index out of range [0, {n}) in {list(idx)[:8]}...")
    if any(a >= b for a, b in zip(idx, idx[1:])):
        raise PlanError(f"{name}: indices must be strictly increasing (sorted, no repeats)")


@dataclass(frozen=True)
class LayerPlan:
    """What one kept layer keeps. `heads[j]` are the kept q heads (0..heads_per_group-1) of group `groups[j]`."""

    source: int
    groups: tuple[int, ...]
    heads: tuple[tuple[int, ...], ...]
    ffn: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "groups": list(self.groups), "heads": [list(h) for h in self.heads],
                "ffn": list(self.ffn)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "LayerPlan":
        return cls(source=int(d["source"]), groups=tuple(d["groups"]), heads=tuple(tuple(h) for h in d["heads"]),
                   ffn=tuple(d["ffn"]))


@dataclass(frozen=True)
class PrunePlan:
    source: LlamaShape
    target: LlamaShape
    hidden: tuple[int, ...]
    layers: tuple[LayerPlan, ...]
    dropped_layers: tuple[int, ...]
    mode: str = "balance"
    method: str = "manual"
    seed: int | None = None
    calibration: dict | None = None          # fingerprint of the calibration tokens (activation importance)
    layer_scores: tuple[float, ...] | None = None  # Block Influence per source layer, when measured
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        self._validate()

    # ------------------------------------------------------------------ internal consistency
    def _validate(self) -> None:
        s, t = self.source, self.target
        if self.schema_version != SCHEMA_VERSION:
            raise PlanError(f"plan schema version {self.schema_version} is not supported (expected {SCHEMA_VERSION})")
        if self.mode not in MODES:
            raise PlanError(f"plan mode {self.mode!r} is not one of {', '.join(MODES)}")
        for f in ("kv_channels", "vocab_size", "tie_word_embeddings"):
            if getattr(s, f) != getattr(t, f):
                raise PlanError(f"target {f} {getattr(t, f)} differs from source {getattr(s, f)}: pruning keeps it")
        if t.num_attention_heads // t.num_query_groups > s.heads_per_group:
            raise PlanError(f"target keeps {t.heads_per_group} heads per group, the source has only "
                            f"{s.heads_per_group} (heads={t.num_attention_heads}, groups={t.num_query_groups})")
        _check_indices("hidden", self.hidden, s.hidden_size, t.hidden_size)
        kept = [lp.source for lp in self.layers]
        _check_indices("layers", kept, s.num_layers, t.num_layers)
        if sorted(set(kept) | set(self.dropped_layers)) != list(range(s.num_layers)) or \
                set(kept) & set(self.dropped_layers):
            raise PlanError(f"kept layers {kept} and dropped layers {list(self.dropped_layers)} must partition "
                            f"0..{s.num_layers - 1}")
        for lp in self.layers:
            self._validate_layer(lp)

    def _validate_layer(self, lp: LayerPlan) -> None:
        s, t = self.source, self.target
        where = f"layer {lp.source}"
        _check_indices(f"{where} groups", lp.groups, s.num_query_groups, t.num_query_groups)
        if len(lp.heads) != len(lp.groups):
            raise PlanError(f"{where}: {len(lp.heads)} head lists for {len(lp.groups)} kept groups")
        for g, heads in zip(lp.groups, lp.heads):
            _check_indices(f"{where} group {g} heads", heads, s.heads_per_group, t.heads_per_group)
        _check_indices(f"{where} ffn", lp.ffn, s.ffn_hidden_size, t.ffn_hidden_size)

    # ------------------------------------------------------------------ fit to a checkpoint / TP size
    def check_source(self, shape: LlamaShape, what: str = "checkpoint") -> None:
        """Raise PlanError unless this plan was made for a model of `shape`'s structure."""
        diff = [f"{f}: plan {getattr(self.source, f)} vs {what} {getattr(shape, f)}" for f in STRUCTURE
                if getattr(self.source, f) != getattr(shape, f)]
        if diff:
            raise PlanError(f"the plan was made for another model shape ({'; '.join(diff)})")

    def rank_counts(self, tp: int) -> dict[str, list[list[int]]]:
        """Kept groups and FFN channels per TP rank, per kept layer: {"groups": [[g_r0, g_r1..]..], "ffn": ...}."""
        s = self.source
        return {"groups": [kept_per_rank(lp.groups, s.num_query_groups, tp) for lp in self.layers],
                "ffn": [kept_per_rank(lp.ffn, s.ffn_hidden_size, tp) for lp in self.layers]}

    def is_balanced(self, tp: int) -> bool:
        counts = self.rank_counts(tp)
        return all(len(set(row)) == 1 for rows in counts.values() for row in rows)

    def check_tp(self, tp: int, mode: str | None = None) -> None:
        """Balance mode needs every TP rank to keep the same number of groups and FFN channels in every layer."""
        s = self.source
        if s.num_query_groups % tp or s.ffn_hidden_size % tp:
            raise PlanError(f"source shape does not split over TP {tp} (groups={s.num_query_groups}, "
                            f"ffn={s.ffn_hidden_size}, tp={tp})")
        if (mode or self.mode) == "global":
            return
        counts = self.rank_counts(tp)
        for kind, rows in counts.items():
            for lp, row in zip(self.layers, rows):
                if len(set(row)) != 1:
                    raise PlanError(f"plan is not balanced at TP {tp}: layer {lp.source} keeps {kind} {row} per "
                                    f"rank (balance mode needs equal counts; use --prune-type global for uneven "
                                    f"shards)")

    # ------------------------------------------------------------------ (de)serialisation
    def to_json(self) -> dict[str, Any]:
        return {"kind": KIND, "schema_version": self.schema_version, "method": self.method, "mode": self.mode,
                "seed": self.seed, "calibration": self.calibration, "source_shape": self.source.to_dict(),
                "target_shape": self.target.to_dict(), "hidden": list(self.hidden),
                "dropped_layers": list(self.dropped_layers),
                "layer_scores": list(self.layer_scores) if self.layer_scores is not None else None,
                "layers": [lp.to_json() for lp in self.layers]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "PrunePlan":
        if d.get("kind") != KIND:
            raise PlanError(f"not a prune plan (kind={d.get('kind')!r}, expected {KIND!r})")
        try:
            scores = d.get("layer_scores")
            return cls(source=LlamaShape.from_dict(d["source_shape"]), target=LlamaShape.from_dict(d["target_shape"]),
                       hidden=tuple(d["hidden"]), layers=tuple(LayerPlan.from_json(x) for x in d["layers"]),
                       dropped_layers=tuple(d["dropped_layers"]), mode=d["mode"], method=d["method"],
                       seed=d.get("seed"), calibration=d.get("calibration"),
                       layer_scores=tuple(scores) if scores is not None else None,
                       schema_version=int(d["schema_version"]))
        except (KeyError, TypeError) as e:
            raise PlanError(f"prune plan lacks or mistypes field {e}") from None

    def dumps(self) -> str:
        return json.dumps(self.to_json(), separators=(",", ":"), sort_keys=True)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.dumps().encode()).hexdigest()

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), self.dumps() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "PrunePlan":
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"{path}: no such plan file")
        try:
            return cls.from_json(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise PlanError(f"{path}: invalid JSON ({e})") from None
        except PlanError as e:
            raise PlanError(f"{path}: {e}") from None

    def replace(self, **changes: Any) -> "PrunePlan":
        return dataclasses.replace(self, **changes)

    def summary(self) -> str:
        s, t = self.source, self.target
        return (f"{self.method}/{self.mode}: layers {s.num_layers}->{t.num_layers} hidden {s.hidden_size}->"
                f"{t.hidden_size} heads {s.num_attention_heads}->{t.num_attention_heads} groups "
                f"{s.num_query_groups}->{t.num_query_groups} ffn {s.ffn_hidden_size}->{t.ffn_hidden_size} "
                f"params {s.num_params():,}->{t.num_params():,}")

