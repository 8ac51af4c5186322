"""The budget search's importance proxy: the damage of a shape, written out here from the plan select.make_plan
makes for it (its kept layers, hidden channels, heads and FFN channels), equals the proxy's table lookups; the
search evaluates the shapes with the lowest damage."""

from __future__ import annotations

import pytest
import torch

from megatron_prune.config.shape import LlamaShape
from megatron_prune.prune.search_proxy import Kept, pick
from megatron_prune.prune.search_space import SearchLimits, find_space
from megatron_prune.prune.select import PruneTarget, Scores, make_plan

GQA = LlamaShape(num_layers=6, hidden_size=64, ffn_hidden_size=96, num_attention_heads=8, num_query_groups=4,
                 kv_channels=16, vocab_size=512)
MHA = LlamaShape(num_layers=5, hidden_size=48, ffn_hidden_size=64, num_attention_heads=8, num_query_groups=8,
                 kv_channels=8, vocab_size=300)


def scores_of(src: LlamaShape, seed: int, layers: bool = True, groups: bool = False) -> Scores:
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=g) ** 3  # noqa: E731 - heavy-tailed, like activations
    n, q = src.num_layers, src.num_query_groups
    return Scores(hidden=rand(src.hidden_size), heads=rand(n, q, src.heads_per_group), ffn=rand(n, src.ffn_hidden_size),
                  layers=rand(n) if layers else None, groups=rand(n, q) if groups else None)


def damage_from_plan(scores: Scores, src: LlamaShape, shape: LlamaShape, tp: int) -> float:
    """The documented formula over the units the plan keeps: BI of the dropped layers + per kept layer
    BI x (1 - (kept head share + kept FFN share) / 2) + (layers + 1) x (1 - kept hidden share)."""
    plan = make_plan(scores, src, PruneTarget.of_shape(shape), tp, "activation")
    bi = scores.layers.double() if scores.layers is not None else torch.ones(src.num_layers, dtype=torch.float64)
    heads, ffn, hidden = scores.heads.double(), scores.ffn.double(), scores.hidden.double()
    total = sum(float(bi[i]) for i in plan.dropped_layers)
    for layer in plan.layers:
        h = heads[layer.source]
        a = sum(float(h[g, k]) for g, kept in zip(layer.groups, layer.heads) for k in kept) / float(h.sum())
        f = float(ffn[layer.source, list(layer.ffn)].sum() / ffn[layer.source].sum())
        total += float(bi[layer.source]) * (1 - (a + f) / 2)
    share = float(hidden[list(plan.hidden)].sum() / hidden.sum())
    return total + (shape.num_layers + 1) * (1 - share)


@pytest.mark.parametrize("src, tp, layers, groups", [(GQA, 2, True, False), (GQA, 1, True, True),
                                                     (MHA, 2, True, False), (MHA, 2, False, False)])
def test_damage_equals_the_formula_on_the_plan_the_shape_gets(src, tp, layers, groups):
    scores = scores_of(src, seed=tp + 3 * layers + 5 * groups, layers=layers, groups=groups)
    limits = SearchLimits(8, max_depth_drop=0.5 if layers else 0.0, candidates=100)
    space = find_space(src, tp, int(0.6 * src.num_params()), limits)
    options = sorted({(c.shape.num_attention_heads, c.shape.num_query_groups) for c in space.shapes})
    kept = Kept.of(scores, src, tp, options)
    assert len(space.shapes) >= 4
    for c in space.shapes:
        assert kept.damage(c.shape) == pytest.approx(damage_from_plan(scores, src, c.shape, tp), rel=1e-9, abs=1e-9)
    assert kept.damage(src) == pytest.approx(0.0, abs=1e-9)  # the source keeps everything


def test_pick_evaluates_the_lowest_damage_and_random_the_closest():
    scores = scores_of(GQA, seed=7)
    space = find_space(GQA, 2, int(0.6 * GQA.num_params()), SearchLimits(8, candidates=3))
    chosen = pick(space, scores, GQA, 2)
    every = sorted(damage_from_plan(scores, GQA, c.shape, 2) for c in space.shapes)
    assert len(chosen.candidates) == 3 and list(chosen.damage) == pytest.approx(every[:3])
    assert chosen.how.startswith(f"the 3 of {len(space.shapes)} maximal shapes with the lowest damage")
    blind = pick(space, None, GQA, 2)
    assert blind.candidates == space.shapes[:3] and blind.damage == (None,) * 3 and "closest" in blind.how
