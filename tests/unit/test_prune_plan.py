"""PrunePlan, targets and selection: TP-independence of random plans, balance counts, JSON, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_prune.config.shape import LlamaShape
from megatron_prune.prune.plan import PlanError, PrunePlan
from megatron_prune.prune.random_plan import random_plan
from megatron_prune.prune.select import PruneTarget, Scores, layer_ids, make_plan, top, top_per_part

SRC = LlamaShape(num_layers=6, hidden_size=64, ffn_hidden_size=96, num_attention_heads=16, num_query_groups=8,
                 kv_channels=16, vocab_size=500)
MHA = SRC.replace(num_attention_heads=8, num_query_groups=8)
SPEC = PruneTarget(hidden_size=40, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=48, drop_layers=(1, 4))


def per_rank(kept, total, tp):
    """Independent count of kept indices in each of tp contiguous partitions."""
    bounds = [(r * total // tp, (r + 1) * total // tp) for r in range(tp)]
    return [sum(lo <= k < hi for k in kept) for lo, hi in bounds]


@pytest.mark.parametrize("mode", ["balance", "global"])
def test_random_plan_is_identical_at_every_tp_size(mode):
    spec = PruneTarget(**{**SPEC.__dict__, "mode": mode})
    plans = [random_plan(SRC, spec, seed=11, tp=tp) for tp in (1, 2, 4)]
    assert plans[0].to_json() == plans[1].to_json() == plans[2].to_json()
    assert plans[0].fingerprint() == plans[2].fingerprint()
    assert random_plan(SRC, spec, seed=12).fingerprint() != plans[0].fingerprint()


def test_random_balance_plan_is_balanced_at_every_feasible_tp():
    plan = random_plan(SRC, SPEC, seed=3)
    t = plan.target
    assert (t.num_layers, t.hidden_size, t.num_attention_heads, t.num_query_groups, t.ffn_hidden_size) == \
           (4, 40, 8, 4, 48)
    assert [lp.source for lp in plan.layers] == [0, 2, 3, 5] and plan.dropped_layers == (1, 4)
    for tp in (1, 2, 4):
        for lp in plan.layers:
            assert per_rank(lp.groups, 8, tp) == [4 // tp] * tp
            assert per_rank(lp.ffn, 96, tp) == [48 // tp] * tp
            assert all(len(h) == 2 for h in lp.heads)
        plan.check_tp(tp)


def test_balance_selection_is_per_partition_and_global_is_not():
    # FFN scores rise with the index: global keeps the top half (all in partition 1); balance keeps each
    # partition's top half.
    heads = torch.rand(1, 4, 2, generator=torch.Generator().manual_seed(0))
    scores = Scores(hidden=torch.arange(8.0), heads=heads, ffn=torch.arange(8.0).unsqueeze(0))
    src = LlamaShape(num_layers=1, hidden_size=8, ffn_hidden_size=8, num_attention_heads=8, num_query_groups=4,
                     kv_channels=2, vocab_size=10)
    g = make_plan(scores, src, PruneTarget(ffn_hidden_size=4, hidden_size=3, mode="global"), tp=2, method="manual")
    b = make_plan(scores, src, PruneTarget(ffn_hidden_size=4, hidden_size=3, mode="balance"), tp=2, method="manual")
    assert g.layers[0].ffn == (4, 5, 6, 7) and b.layers[0].ffn == (2, 3, 6, 7)
    assert g.hidden == b.hidden == (5, 6, 7)
    assert not g.is_balanced(2) and b.is_balanced(2)
    with pytest.raises(PlanError, match="not balanced at TP 2"):
        g.check_tp(2, "balance")
    g.check_tp(2)  # a global plan may be uneven


@pytest.mark.parametrize("mode", ["global", "balance"])
def test_group_scores_drive_group_choice_when_given(mode):
    # heads say groups 0 and 2 (of 4, 2 per TP partition); the groups' own scores (Taylor: heads + k + v, signs
    # inside) say 1 and 3. Heads inside a kept group are still chosen by head scores.
    src = LlamaShape(num_layers=1, hidden_size=8, ffn_hidden_size=8, num_attention_heads=8, num_query_groups=4,
                     kv_channels=2, vocab_size=10)
    heads = torch.tensor([[[5.0, 4.0], [1.0, 0.0], [6.0, 3.0], [0.0, 2.0]]])
    spec = PruneTarget(num_attention_heads=2, num_query_groups=2, mode=mode)
    plain = make_plan(Scores(torch.ones(8), heads, torch.ones(1, 8)), src, spec, tp=2, method="manual")
    assert plain.layers[0].groups == (0, 2)
    with_groups = Scores(torch.ones(8), heads, torch.ones(1, 8), groups=torch.tensor([[0.5, 9.0, 0.1, 7.0]]))
    plan = make_plan(with_groups, src, spec, tp=2, method="taylor")
    assert plan.layers[0].groups == (1, 3) and plan.layers[0].heads == ((0,), (1,))
    with pytest.raises(PlanError, match=r"groups scores have shape \(1, 3\), expected \(1, 4\)"):
        make_plan(Scores(torch.ones(8), heads, torch.ones(1, 8), groups=torch.ones(1, 3)), src, spec, tp=2,
                  method="taylor")


def test_selection_primitives_and_ties():
    assert top(torch.tensor([1.0, 3.0, 3.0, 0.0, 2.0]), 2) == [1, 2]
    assert top(torch.tensor([0.0, 0.0, 0.0, 1.0]), 2) == [0, 3]  # a tie goes to the lower index
    assert top_per_part(torch.tensor([5.0, 1.0, 2.0, 9.0, 0.0, 8.0]), 2, 2) == [0, 3]
    assert layer_ids("7,13, 18 24") == (7, 13, 18, 24) and layer_ids("") == ()
    with pytest.raises(PlanError, match="comma-separated"):
        layer_ids("7;x")


def test_mha_heads_prune_whole_groups_by_default():
    t = PruneTarget(num_attention_heads=4).resolve(MHA, 2)
    assert (t.num_attention_heads, t.num_query_groups) == (4, 4)
    t = PruneTarget(num_attention_heads=8).resolve(SRC, 2)  # GQA keeps its 8 groups, 1 head per group
    assert (t.num_attention_heads, t.num_query_groups) == (8, 8)


def test_plan_json_round_trip(tmp_path):
    plan = random_plan(SRC, SPEC, seed=5)
    plan.save(tmp_path / "p.json")
    back = PrunePlan.load(tmp_path / "p.json")
    assert back == plan and back.fingerprint() == plan.fingerprint()
    d = json.loads((tmp_path / "p.json").read_text())
    assert d["schema_version"] == 1 and d["method"] == "random" and d["seed"] == 5
    assert d["source_shape"]["hidden_size"] == 64 and d["target_shape"]["hidden_size"] == 40


@pytest.mark.parametrize("spec, tp, message", [
    (PruneTarget(hidden_size=65), 1, "hidden_size remain 65 > original 64"),
    (PruneTarget(ffn_hidden_size=200), 1, "ffn_hidden_size remain 200 > original 96"),
    (PruneTarget(num_query_groups=10), 1, "num_query_groups remain 10 > original 8"),
    (PruneTarget(ffn_hidden_size=90), 4, r"ffn_hidden_size remain 90 not divisible by TP 4 in balance mode"),
    (PruneTarget(num_query_groups=6), 4, r"num_query_groups remain 6 not divisible by TP 4 .*tp=4"),
    (PruneTarget(num_attention_heads=10, num_query_groups=4), 1,
     r"heads remain 10 not a multiple of query groups remain 4 \(heads=10, groups=4\)"),
    (PruneTarget(num_attention_heads=16, num_query_groups=4), 1, "4 heads per group, more than the source's 2"),
    (PruneTarget(drop_layers=(6,)), 1, r"drop layers \[6\] out of range: layer ids are 0-based, 0..5"),
    (PruneTarget(drop_layers=(-1,)), 1, "out of range"),
    (PruneTarget(drop_layers=(2, 2)), 1, "repeat a layer id"),
    (PruneTarget(num_layers=5, drop_layers=(1, 2)), 1, "disagrees with dropping 2"),
    (PruneTarget(hidden_size=0), 1, "positive integer"),
    (PruneTarget(mode="fancy"), 1, "--prune-type 'fancy'"),
])
def test_bad_targets(spec, tp, message):
    with pytest.raises(PlanError, match=message):
        spec.resolve(SRC, tp)


def test_global_mode_accepts_counts_not_divisible_by_tp():
    assert PruneTarget(ffn_hidden_size=90, mode="global").resolve(SRC, 4).ffn_hidden_size == 90


def test_layer_count_without_scores_needs_block_influence():
    with pytest.raises(PlanError, match="needs layer scores"):
        make_plan(Scores(torch.ones(64), torch.ones(6, 8, 2), torch.ones(6, 96)), SRC, PruneTarget(num_layers=4),
                  tp=1, method="magnitude")


def test_plan_for_another_shape_is_rejected():
    plan = random_plan(SRC, SPEC, seed=1)
    plan.check_source(SRC.replace(dtype="bfloat16", rope_theta=5e5))  # structure is what matters
    with pytest.raises(PlanError, match=r"another model shape \(hidden_size: plan 64 vs checkpoint 128"):
        plan.check_source(SRC.replace(hidden_size=128))


def _edit(plan, **layer0):
    d = plan.to_json()
    d["layers"][0].update(layer0)
    return d


@pytest.mark.parametrize("edit, message", [
    (lambda p: _edit(p, ffn=list(reversed(p.layers[0].ffn))), "strictly increasing"),
    (lambda p: _edit(p, ffn=list(p.layers[0].ffn[:-1])), "47 indices kept, the target shape needs 48"),
    (lambda p: _edit(p, groups=[0, 1, 2, 9]), r"index out of range \[0, 8\)"),
    (lambda p: _edit(p, heads=[[0, 1]] * 3), "3 head lists for 4 kept groups"),
    (lambda p: {**p.to_json(), "dropped_layers": [1]}, "must partition"),
    (lambda p: {**p.to_json(), "schema_version": 99}, "schema version 99"),
    (lambda p: {**p.to_json(), "kind": "other"}, "not a prune plan"),
])
def test_inconsistent_plan_files_are_rejected(tmp_path, edit, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(edit(random_plan(SRC, SPEC, seed=2))))
    with pytest.raises(PlanError, match=message):
        PrunePlan.load(path)
