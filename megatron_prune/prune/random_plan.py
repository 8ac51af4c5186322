"""Seeded random plans, identical at every TP size.

Random scores come from one CPU generator in a fixed order (hidden, then per layer heads and FFN, then layers),
so every rank and every TP size draws the same numbers. In balance mode a per-TP-rank choice would still make
the plan depend on TP; instead the choice is balanced over gcd(source, target) partitions, which makes it
balanced at every TP size that can run the target at all (tp must divide both counts, hence their gcd).
"""

from __future__ import annotations

import math

import torch

from megatron_prune.config.shape import LlamaShape
from megatron_prune.prune.plan import PrunePlan
from megatron_prune.prune.select import PruneTarget, Scores, make_plan


def random_scores(shape: LlamaShape, seed: int) -> Scores:
    gen = torch.Generator().manual_seed(int(seed))
    hidden = torch.rand(shape.hidden_size, generator=gen)
    heads, ffn = [], []
    for _ in range(shape.num_layers):
        heads.append(torch.rand(shape.num_query_groups, shape.heads_per_group, generator=gen))
        ffn.append(torch.rand(shape.ffn_hidden_size, generator=gen))
    layers = torch.rand(shape.num_layers, generator=gen)
    return Scores(hidden=hidden, heads=torch.stack(heads), ffn=torch.stack(ffn), layers=layers)


def tp_free_parts(src: LlamaShape, target: LlamaShape) -> tuple[int, int]:
    """Partition counts that make a balance-mode choice valid at every feasible TP size."""
    return (math.gcd(src.num_query_groups, target.num_query_groups),
            math.gcd(src.ffn_hidden_size, target.ffn_hidden_size))


def random_plan(shape: LlamaShape, spec: PruneTarget, seed: int, tp: int = 1) -> PrunePlan:
    """A random plan for `spec` (validated at `tp`); the same seed gives the same plan at any TP size."""
    target = spec.resolve(shape, tp)
    plan = make_plan(random_scores(shape, seed), shape, spec, tp, method="random",
                     parts=tp_free_parts(shape, target), seed=int(seed))
    return plan.replace(layer_scores=None)  # random draws, not measurements
