"""The budget search's pure parts: held-out split, the report file and the stdout table."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from megatron_prune.config.shape import LlamaShape
from megatron_prune.errors import UserError
from megatron_prune.prune.budget import Budget
from megatron_prune.prune.config import SearchConfig
from megatron_prune.prune.search_proxy import Selection
from megatron_prune.prune.search_run import SearchReport, choose, split_windows
from megatron_prune.prune.search_space import Candidate, SearchLimits, Space

SRC = LlamaShape(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=8, num_query_groups=4,
                 kv_channels=16, vocab_size=512)


def test_held_out_windows_are_disjoint_and_taken_from_the_end():
    w = torch.arange(10 * 5).view(10, 5)
    scoring, held = split_windows(w, scoring=6, held_out=3, source="x")
    assert scoring.tolist() == w[:6].tolist() and held.tolist() == w[7:].tolist()
    scoring, held = split_windows(w, scoring=64, held_out=4, source="x")  # short text: scoring gets the rest
    assert len(scoring) == 6 and held.tolist() == w[6:].tolist()


def test_too_few_windows_is_one_user_error_naming_the_source():
    with pytest.raises(UserError, match=r"calib\.txt: 3 calibration windows, the search needs at least 5"):
        split_windows(torch.zeros(3, 5, dtype=torch.long), scoring=8, held_out=4, source="calib.txt")


@pytest.mark.parametrize("bad", [dict(eval_samples=0), dict(kd_iters=-1), dict(kd_lr=0.0)])
def test_search_config_refuses_bad_values(bad):
    with pytest.raises(UserError):
        SearchConfig(target_params="50%", **bad)


def report(kd: bool = False, budget: Budget = Budget(params=200_000), megatron_only: bool = False,
           memory: bool = False) -> SearchReport:
    # hidden 36 with 8 heads: only megatron-core runs it
    shapes = [SRC.replace(num_layers=3), SRC.replace(hidden_size=36 if megatron_only else 48)]
    cands = tuple(Candidate(shape=s, params=s.num_params(), budget=budget,
                            memory=budget.memory_of(s) if memory else None) for s in shapes)
    space = Space(budget=budget, limits=SearchLimits(8, megatron_only_shapes=megatron_only), lower=0.9, valid=7,
                  shapes=cands)
    selection = Selection(candidates=cands, damage=(0.25, 0.5), how="the 2 of 2 maximal shapes with the lowest")
    return SearchReport(space=space, selection=selection, losses=(6.5, 6.25), chosen=1, method="activation",
                        held_out={"sha256": "ab", "tokens": 64}, kd_iters=2 if kd else 0, seconds={"total": 1.0},
                        pruned_losses=(7.0, 7.5) if kd else ())


def test_report_json_has_the_documented_fields():
    d = json.loads(json.dumps(report().to_json()))
    assert d["budget"]["params"] == 200_000 and d["chosen"] == 1
    assert [sorted(c) for c in d["candidates"]] == [["hf_loadable", "params", "proxy_damage", "score", "shape"]] * 2
    assert LlamaShape.from_dict(d["candidates"][1]["shape"]).hidden_size == 48
    assert [c["proxy_damage"] for c in d["candidates"]] == [0.25, 0.5] and d["selection"]["evaluated"] == 2
    assert d["space"] == {"window": [0.9, 1.0], "widened": True, "valid_shapes": 7, "maximal_shapes": 2,
                          "width_multiple": 8, "megatron_only_shapes": False}
    assert d["selection"]["how"].startswith("the 2 of 2 maximal shapes")
    kd = report(kd=True).to_json()["candidates"]
    assert [c["loss_after_pruning"] for c in kd] == [7.0, 7.5] and [c["score"] for c in kd] == [6.5, 6.25]


def test_header_says_the_window_the_shape_set_and_how_the_evaluated_were_picked():
    head = report().header().splitlines()
    assert len(head) == 2 and "window 90-100% (widened from 95%" in head[0] and "7 valid shapes HF" in head[0]
    assert head[1].startswith("evaluated: the 2 of 2 maximal shapes") and "64 held-out tokens" in head[1]
    assert "--megatron-only-shapes" in report(megatron_only=True).header()


def test_non_finite_losses_never_win_and_are_null_in_json():
    cands = list(report().candidates)
    assert choose([float("nan"), 7.0], cands) == 1 and choose([6.0, float("inf")], cands) == 0
    assert choose([6.0, 6.0], cands) == 0  # a tie goes to the shape closer to the budget
    with pytest.raises(UserError, match="non-finite"):
        choose([float("nan"), float("inf")], cands)
    r = dataclasses.replace(report(), losses=(float("nan"), 6.25))
    assert json.loads(json.dumps(r.to_json()))["candidates"][0]["score"] is None


def test_memory_budget_adds_a_memory_column_and_field():
    budget = Budget(params=200_000, memory=10**6, seq_length=64)
    r = report(budget=budget, memory=True)
    cands = r.candidates
    lines = r.table().splitlines()
    assert lines[0].split()[3:5] == ["memory", "GiB"] and f"{cands[1].memory / 2**30:.4f}" in lines[2]
    assert [c["memory_bytes"] for c in r.to_json()["candidates"]] == [c.memory for c in cands]


def test_table_marks_exactly_the_chosen_row_and_shows_the_proxy_damage():
    lines = report().table().splitlines()
    assert lines[0].split() == ["rank", "shape", "params", "damage", "loss", "chosen"]
    assert [line.rstrip().endswith("*") for line in lines[1:]] == [False, True]
    assert "6.2500" in lines[2] and "0.5000" in lines[2] and f"{SRC.replace(hidden_size=48).num_params():,}" in lines[2]


def test_megatron_only_shapes_get_an_hf_column():
    lines = report(megatron_only=True).table().splitlines()
    assert lines[0].split() == ["rank", "shape", "params", "damage", "HF", "loss", "chosen"]
    assert [line.split()[-3 if line.rstrip().endswith("*") else -2] for line in lines[1:]] == ["yes", "no"]
