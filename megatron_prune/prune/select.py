"""Targets and selection: (importance scores, target sizes, mode) -> PrunePlan. Pure, no I/O, no processes.

balance: every TP partition keeps the same number of query groups and FFN channels, the best inside itself
         (`parts` partitions; the TP size for measured scores).
global:  the best groups / FFN channels over the whole layer; TP shards become uneven.
Hidden channels and the heads inside a kept group are never split over TP ranks: always chosen globally.
Ties are broken towards the lower index (stable sort), so a selection is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from megatron_prune.checkpoint.layout import rank_range
from megatron_prune.config.shape import LlamaShape
from megatron_prune.prune.plan import MODES, LayerPlan, PlanError, PrunePlan


@dataclass(frozen=True)
class Scores:
    """Global importance (higher = keep) of every prunable unit of the source model, fp32."""

    hidden: torch.Tensor                 # [hidden]
    heads: torch.Tensor                  # [layers, groups, heads_per_group]
    ffn: torch.Tensor                    # [layers, ffn]
    layers: torch.Tensor | None = None   # [layers] (Block Influence), None when not measured
    groups: torch.Tensor | None = None   # [layers, groups]: a query group's own score (Taylor: its heads, k
                                         # and v together); None: the sum of its heads' scores


@dataclass(frozen=True)
class PruneTarget:
    """What to keep; None = keep the source's size. `num_layers` without `drop_layers`: chosen by layer scores."""

    hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_query_groups: int | None = None
    ffn_hidden_size: int | None = None
    num_layers: int | None = None
    drop_layers: tuple[int, ...] = ()
    mode: str = "balance"

    @classmethod
    def of_shape(cls, shape: LlamaShape, mode: str = "balance") -> "PruneTarget":
        """The target that keeps exactly `shape`'s sizes (layers chosen by scores)."""
        return cls(hidden_size=shape.hidden_size, num_attention_heads=shape.num_attention_heads,
                   num_query_groups=shape.num_query_groups, ffn_hidden_size=shape.ffn_hidden_size,
                   num_layers=shape.num_layers, mode=mode)

    def resolve(self, src: LlamaShape, tp: int) -> LlamaShape:
        """The target shape; raises PlanError naming every factor unless it is reachable from `src` at `tp`."""
        if self.mode not in MODES:
            raise PlanError(f"--prune-type {self.mode!r} is not one of {', '.join(MODES)}")
        hidden = _remain("hidden_size", self.hidden_size, src.hidden_size)
        ffn = _remain("ffn_hidden_size", self.ffn_hidden_size, src.ffn_hidden_size)
        groups, heads = self._attention(src)
        layers = self._layers(src)
        if self.mode == "balance":
            for name, n in (("num_query_groups", groups), ("ffn_hidden_size", ffn)):
                if n % tp:
                    raise PlanError(f"{name} remain {n} not divisible by TP {tp} in balance mode "
                                    f"(heads={heads}, groups={groups}, ffn={ffn}, tp={tp})")
        return src.replace(hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
                           num_query_groups=groups, num_layers=layers)

    def _attention(self, src: LlamaShape) -> tuple[int, int]:
        mha = src.num_query_groups == src.num_attention_heads
        heads_given = self.num_attention_heads is not None
        groups = self.num_query_groups
        if groups is None:  # MHA stays MHA; GQA keeps its groups and loses heads inside them
            groups = self.num_attention_heads if (mha and heads_given) else src.num_query_groups
        groups = _remain("num_query_groups", groups, src.num_query_groups)
        heads = self.num_attention_heads if heads_given else groups * src.heads_per_group
        heads = _remain("num_attention_heads", heads, src.num_attention_heads)
        if heads % groups:
            raise PlanError(f"heads remain {heads} not a multiple of query groups remain {groups} "
                            f"(heads={heads}, groups={groups})")
        if heads // groups > src.heads_per_group:
            raise PlanError(f"{heads} heads in {groups} groups is {heads // groups} heads per group, more than the "
                            f"source's {src.heads_per_group} (heads={src.num_attention_heads}, "
                            f"groups={src.num_query_groups})")
        return groups, heads

    def _layers(self, src: LlamaShape) -> int:
        drop = list(self.drop_layers)
        bad = [i for i in drop if not 0 <= i < src.num_layers]
        if bad:
            raise PlanError(f"drop layers {bad} out of range: layer ids are 0-based, 0..{src.num_layers - 1}")
        if len(set(drop)) != len(drop):
            raise PlanError(f"drop layers {drop} repeat a layer id")
        layers = src.num_layers - len(drop)
        if self.num_layers is not None and drop and self.num_layers != layers:
            raise PlanError(f"num_layers remain {self.num_layers} disagrees with dropping {len(drop)} of "
                            f"{src.num_layers} layers ({layers} remain)")
        layers = _remain("num_layers", self.num_layers if not drop else layers, src.num_layers)
        return layers


def _remain(name: str, value: int | None, original: int) -> int:
    if value is None:
        return original
    if not isinstance(value, int) or value < 1:
        raise PlanError(f"{name} remain must be a positive integer, got {value!r}")
    if value > original:
        raise PlanError(f"{name} remain {value} > original {original}")
    return value


# ----------------------------------------------------------------------------- selection primitives
def top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest scores, sorted ascending; ties go to the lower index."""
    order = torch.sort(scores.float(), descending=True, stable=True).indices[:k]
    return sorted(order.tolist())


def top_per_part(scores: torch.Tensor, k: int, parts: int) -> list[int]:
    """The best k/parts of each of `parts` equal contiguous partitions (a TP rank's slice when parts = TP)."""
    n = scores.shape[0]
    if n % parts or k % parts:
        raise PlanError(f"cannot keep {k} of {n} evenly over {parts} partitions (n={n}, keep={k}, parts={parts})")
    keep = k // parts
    out: list[int] = []
    for p in range(parts):
        own = rank_range(n, parts, p)
        out += [own.start + i for i in top(scores[own.start:own.stop], keep)]
    return out


def select_layers(src: LlamaShape, target: LlamaShape, spec: PruneTarget, layer_scores: torch.Tensor | None
                  ) -> list[int]:
    """Dropped layer ids: the explicit list, else the (src - target) layers with the lowest scores."""
    if spec.drop_layers:
        return sorted(spec.drop_layers)
    n_drop = src.num_layers - target.num_layers
    if n_drop == 0:
        return []
    if layer_scores is None:
        raise PlanError(f"choosing {n_drop} layers to drop needs layer scores (Block Influence from "
                        f"--importance activation or taylor); or name them with --drop-layers")
    return sorted(torch.sort(layer_scores.float(), stable=True).indices[:n_drop].tolist())


def make_plan(scores: Scores, src: LlamaShape, spec: PruneTarget, tp: int, method: str,
              parts: tuple[int, int] | None = None, seed: int | None = None, calibration: dict | None = None
              ) -> PrunePlan:
    """Select by `scores`. `parts` = (group partitions, FFN partitions) for balance mode; default (tp, tp)."""
    check_scores(scores, src)
    target = spec.resolve(src, tp)
    g_parts, f_parts = parts or (tp, tp)
    dropped = select_layers(src, target, spec, scores.layers)
    layers = []
    for i in range(src.num_layers):
        if i in dropped:
            continue
        heads = scores.heads[i].float()                   # [groups, heads_per_group]
        group_score = heads.sum(dim=1) if scores.groups is None else scores.groups[i].float()
        g_keep = target.num_query_groups
        groups = top(group_score, g_keep) if spec.mode == "global" else top_per_part(group_score, g_keep, g_parts)
        kept_heads = tuple(tuple(top(heads[g], target.heads_per_group)) for g in groups)
        f_keep = target.ffn_hidden_size
        ffn = top(scores.ffn[i], f_keep) if spec.mode == "global" else top_per_part(scores.ffn[i], f_keep, f_parts)
        layers.append(LayerPlan(source=i, groups=tuple(groups), heads=kept_heads, ffn=tuple(ffn)))
    return PrunePlan(source=src, target=target, hidden=tuple(top(scores.hidden, target.hidden_size)),
                     layers=tuple(layers), dropped_layers=tuple(dropped), mode=spec.mode, method=method, seed=seed,
                     calibration=calibration, layer_scores=_floats(scores.layers))


def _floats(t: torch.Tensor | None) -> tuple[float, ...] | None:
    return None if t is None else tuple(float(x) for x in t.tolist())


def check_scores(scores: Scores, src: LlamaShape) -> None:
    want = {"hidden": (src.hidden_size,), "heads": (src.num_layers, src.num_query_groups, src.heads_per_group),
            "ffn": (src.num_layers, src.ffn_hidden_size), "groups": (src.num_layers, src.num_query_groups)}
    for name, shape in want.items():
        if getattr(scores, name) is None and name == "groups":
            continue
        got = tuple(getattr(scores, name).shape)
        if got != shape:
            raise PlanError(f"{name} scores have shape {got}, expected {shape}")


def layer_ids(text: str | Sequence[int] | None) -> tuple[int, ...]:
    """'7,13,18,24' (or '7 13 18 24') -> (7, 13, 18, 24)."""
    if text is None or text == "":
        return ()
    if not isinstance(text, str):
        return tuple(int(x) for x in text)
    try:
        return tuple(int(x) for x in text.replace(",", " ").split())
    except ValueError:
        raise PlanError(f"drop layers {text!r}: expected comma-separated layer ids, e.g. 7,13,18,24") from None
