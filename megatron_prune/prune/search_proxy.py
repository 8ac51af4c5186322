"""The budget search's importance proxy: how much a shape's plan would disturb the model, estimated from the one
calibration pass (the Scores every candidate's plan is made from) without running the model again. Pure.

    kept = Kept.of(scores, src, tp, attention_options)   # sorted, cumulated scores: built once
    kept.damage(shape)                                   # lower = the shape keeps more of what matters

The damage is counted in Block Influence units (BI_l = mean over tokens of 1 - cos(layer input, layer output):
how much layer l turns the residual stream):
- a dropped layer costs its BI;
- a kept layer whose heads or FFN channels are pruned costs the share of its BI they carried: BI_l x (1 - (a_l +
  f_l) / 2), a_l and f_l the shares of the layer's head and FFN importance its plan keeps (the layer's update is
  taken half attention, half MLP);
- removing hidden channels changes the stream every kept layer reads and the output layer reads: (layers + 1) x
  (1 - h), h the share of the hidden importance kept.
Each share comes from the plan's own nested selections (select.make_plan): layers dropped by lowest BI, the top
hidden channels, per kept layer the top heads of each query group (MHA: the top groups per TP partition) and the
top FFN channels per TP partition. Methods without layer scores (magnitude) count every layer as BI 1.

Measured on SmolLM2-135M at the demo budget (TP 3, activation importance, 56 shapes: multiples 128 and 64, and the
demo's hand shape, on 8,192 held-out tokens; benchmarks/budget_search.py): Spearman rank correlation with the loss 0.70,
against 0.20 for the product of the four kept shares and 0.07 for closeness to the budget (the old ranking). The
hidden term is what the product misses: hidden channels are read by every layer, so keeping 83% of their
importance (hidden 448 of 576) costs more than keeping 72% of the heads' (6 of 9 heads per layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from megatron_prune.config.shape import LlamaShape
from megatron_prune.prune.search_space import Candidate, Space
from megatron_prune.prune.select import Scores, top, top_per_part


@dataclass(frozen=True)
class Kept:
    """Per-axis tables of a source's Scores: cumulated sorted scores, so that a shape's kept share is a lookup."""
    src: LlamaShape
    tp: int
    layer_order: tuple[int, ...]     # layers in the order select_layers drops them (lowest score first)
    block: torch.Tensor              # [layers] Block Influence (ones when the method has no layer scores)
    hidden: torch.Tensor             # [hidden + 1] share of the hidden importance kept by the top n channels
    ffn: torch.Tensor                # [layers, ffn + 1] per layer, share kept by n channels (balanced over TP)
    attention: dict                  # (heads, groups) -> [layers] share of the layer's head importance kept

    @classmethod
    def of(cls, scores: Scores, src: LlamaShape, tp: int, attention: Sequence[tuple[int, int]]) -> "Kept":
        n = src.num_layers
        block = scores.layers.double() if scores.layers is not None else torch.ones(n, dtype=torch.float64)
        order = tuple(torch.sort(block.float(), stable=True).indices.tolist())
        h = torch.sort(scores.hidden.double(), descending=True).values
        hidden = torch.cat([torch.zeros(1, dtype=torch.float64), h.cumsum(0)]) / h.sum()
        return cls(src=src, tp=tp, layer_order=order, block=block, hidden=hidden,
                   ffn=_ffn_table(scores.ffn.double(), tp),
                   attention={a: _attention_kept(scores, src, tp, *a) for a in attention})

    def damage(self, shape: LlamaShape) -> float:
        """Block Influence of the dropped layers + the pruned share of each kept layer's + the hidden term."""
        cut = self.src.num_layers - shape.num_layers
        dropped, kept = list(self.layer_order[:cut]), list(self.layer_order[cut:])
        attn = self.attention[shape.num_attention_heads, shape.num_query_groups][kept]
        width = 1 - (attn + self.ffn[kept, shape.ffn_hidden_size]) / 2
        hidden = (shape.num_layers + 1) * (1 - self.hidden[shape.hidden_size])
        return float(self.block[dropped].sum() + (self.block[kept] * width).sum() + hidden)


def _ffn_table(ffn: torch.Tensor, tp: int) -> torch.Tensor:
    """[layers, F + 1]: column n = share of the layer's FFN importance kept by top_per_part(n, tp) (n % tp == 0;
    other columns are never read)."""
    layers, width = ffn.shape
    parts = torch.sort(ffn.view(layers, tp, width // tp), dim=-1, descending=True).values.cumsum(-1)
    per_rank = torch.cat([torch.zeros(layers, tp, 1, dtype=ffn.dtype), parts], dim=-1).sum(1)  # [layers, F/tp + 1]
    table = torch.zeros(layers, width + 1, dtype=ffn.dtype)
    table[:, ::tp] = per_rank
    return table / ffn.sum(1, keepdim=True)


def _attention_kept(scores: Scores, src: LlamaShape, tp: int, heads: int, groups: int) -> torch.Tensor:
    """[layers] share of each layer's head importance kept at (heads, groups), selected as make_plan does."""
    out = torch.zeros(src.num_layers, dtype=torch.float64)
    for i in range(src.num_layers):
        h = scores.heads[i].double()                            # [groups, heads_per_group]
        group_score = h.sum(dim=1) if scores.groups is None else scores.groups[i].double()
        kept_groups = top_per_part(group_score, groups, tp) if groups < src.num_query_groups else range(groups)
        out[i] = sum(h[g, top(h[g], heads // groups)].sum() for g in kept_groups) / h.sum()
    return out


@dataclass(frozen=True)
class Selection:
    """The shapes the search evaluates by loss: the `k` maximal shapes of the space with the lowest proxy damage,
    or (no scores: random importance) the `k` closest to the budget."""
    candidates: tuple[Candidate, ...]
    damage: tuple[float | None, ...]
    how: str

    def to_json(self) -> dict:
        return {"how": self.how, "evaluated": len(self.candidates)}


def pick(space: Space, scores: Scores | None, src: LlamaShape, tp: int) -> Selection:
    """Rank every maximal shape of `space` by the proxy and keep the best `space.limits.candidates` (ties: the
    order of space.shapes, closest to the budget first)."""
    k, shapes = space.limits.candidates, space.shapes
    if scores is None:
        return Selection(shapes[:k], (None,) * len(shapes[:k]),
                         f"the {len(shapes[:k])} of {len(shapes)} maximal shapes closest to the budget (random "
                         f"importance has no scores to rank them by)")
    attention = sorted({(c.shape.num_attention_heads, c.shape.num_query_groups) for c in shapes})
    kept = Kept.of(scores, src, tp, attention)
    damage = [kept.damage(c.shape) for c in shapes]
    order = sorted(range(len(shapes)), key=lambda i: damage[i])[:k]  # stable: ties keep the closer shape
    return Selection(tuple(shapes[i] for i in order), tuple(damage[i] for i in order),
                     f"the {len(order)} of {len(shapes)} maximal shapes with the lowest damage estimate (importance "
                     f"proxy from the calibration scores)")
