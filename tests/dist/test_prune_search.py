"""`prune --target-params`: candidates scored in memory at TP=2, the best written. The in-memory loss of the
chosen candidate equals the loss of the written checkpoint loaded from disk (<= 1e-5) and, independently, of its
HF export under transformers; every rank reports the same numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_prune.checkpoint import megatron_io as mio
from megatron_prune.checkpoint.convert_files import hf_to_megatron, megatron_to_hf
from megatron_prune.model.evaluate import evaluate_hf
from megatron_prune.testing import run_distributed
from tests.helpers import make_hf_model, save_tiny_tokenizer

pytestmark = pytest.mark.dist
GQA = dict(num_attention_heads=8, num_key_value_heads=4)
TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom. The quick brown fox "
        "jumps over the lazy dog. ") * 120
LIMITS = dict(width_multiple=8, candidates=4)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    make_hf_model(root / "gqa", seed=2, **GQA)
    hf_to_megatron(root / "gqa", root / "gqa-tp2", tp=2, progress=False)
    make_hf_model(root / "tied-hf", seed=3, tie_word_embeddings=True, **GQA)
    hf_to_megatron(root / "tied-hf", root / "tied-tp2", tp=2, progress=False)
    tok = save_tiny_tokenizer(root / "tok")
    (root / "text.txt").write_text(TEXT)
    calib = dict(data=str(root / "text.txt"), tokenizer=str(tok), samples=6, seq_length=32, micro_batch_size=2)
    base = dict(load=str(root / "gqa-tp2"), budget="60%", limits=LIMITS, eval_samples=4, calib=calib)
    cases = [dict(base, name="activation", importance="activation", check_loser=True),
             dict(base, name="tied", importance="activation", load=str(root / "tied-tp2")),
             dict(base, name="random", importance="random"),
             dict(base, name="taylor", importance="taylor"),
             dict(base, name="kd", importance="activation", kd_iters=3)]
    for c in cases:
        c["save"] = str(root / c["name"])
    per_rank = run_distributed(2, "tests.dist.search_cases:search_then_evaluate", {"cases": cases})
    return {"root": root, "per_rank": per_rank, "cases": {c["name"]: c for c in cases}}


@pytest.mark.parametrize("name", ["activation", "tied", "random", "taylor", "kd"])
def test_in_memory_loss_equals_the_written_checkpoint(world, name):
    for rank in range(2):
        run = world["per_rank"][rank][name]
        report, mine = run["report"], dict(run["in_memory"])
        assert report == world["per_rank"][0][name]["in_memory"]  # the file is rank 0's report
        assert {k: v for k, v in report.items() if k != "seconds"} == {k: v for k, v in mine.items() if k != "seconds"}
        chosen = report["candidates"][report["chosen"]]
        assert report["held_out"]["sha256"] == run["held_out_sha256"]
        in_memory = chosen["loss_after_pruning" if name == "kd" else "score"]  # kd: the written weights are pruned
        assert abs(in_memory - run["written_loss"]) <= 1e-5, (in_memory, run["written_loss"])


def test_a_losing_candidate_pruned_by_hand_has_the_loss_the_search_measured(world):
    """Not only the winner: the worst candidate, pruned from its sizes by a plain prune and written, evaluates to
    the search's in-memory number (and is worse than the winner on disk too)."""
    run = world["per_rank"][0]["activation"]
    report, loser = run["report"], run["loser"]
    assert loser["index"] != report["chosen"]
    assert abs(report["candidates"][loser["index"]]["score"] - loser["written_loss"]) <= 1e-5
    assert loser["written_loss"] > run["written_loss"]


def test_the_lowest_loss_wins_and_is_what_was_written(world):
    root = world["root"]
    for name in ("activation", "random", "taylor", "kd"):
        report = world["per_rank"][0][name]["report"]
        scores = [c["score"] for c in report["candidates"]]
        assert len(scores) == LIMITS["candidates"] and all(isinstance(s, float) for s in scores)
        assert report["chosen"] == scores.index(min(scores))
        budget = round(0.6 * mio.read_meta(root / "gqa-tp2").shape.num_params())
        assert report["budget"]["params"] == budget and report["budget"]["memory_bytes"] is None
        written = mio.read_meta(root / name).shape
        chosen = report["candidates"][report["chosen"]]
        assert written.to_dict() == chosen["shape"] and written.num_params() == chosen["params"]
        assert 0.95 * budget <= chosen["params"] <= budget
        plan = json.loads((root / name / "prune_plan.json").read_text())
        assert plan["target_shape"] == chosen["shape"] and plan["method"] == world["cases"][name]["importance"]
        space = report["space"]
        assert space["valid_shapes"] >= space["maximal_shapes"] >= len(scores) and space["width_multiple"] == 8
        damage = [c["proxy_damage"] for c in report["candidates"]]
        if name == "random":  # no scores: the closest to the budget, no proxy
            assert damage == [None] * len(damage) and "closest to the budget" in report["selection"]["how"]
        else:
            assert damage == sorted(damage) and "lowest damage estimate" in report["selection"]["how"]


def test_distillation_steps_change_the_scores(world):
    plain = world["per_rank"][0]["activation"]["report"]
    kd = world["per_rank"][0]["kd"]["report"]
    assert [c["shape"] for c in plain["candidates"]] == [c["shape"] for c in kd["candidates"]]
    assert kd["kd_iters"] == 3 and all(a["score"] == b["loss_after_pruning"] != b["score"]
                                       for a, b in zip(plain["candidates"], kd["candidates"]))


def test_the_chosen_loss_matches_transformers_on_the_hf_export(world, tmp_path):
    from transformers import LlamaForCausalLM

    run = world["per_rank"][0]["activation"]
    megatron_to_hf(world["root"] / "activation", tmp_path / "hf", progress=False)
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    ref = evaluate_hf(hf, run["windows"]).loss
    assert sum(p.numel() for p in hf.parameters()) == run["report"]["candidates"][run["report"]["chosen"]]["params"]
    chosen = run["report"]["candidates"][run["report"]["chosen"]]["score"]
    assert abs(chosen - ref) <= 1e-4 * abs(ref), (chosen, ref)


@pytest.mark.slow  # a full CLI search; the in-memory search and its report are tested above
def test_cli_prints_the_table_and_refuses_too_little_held_out_text(world, tmp_path):
    root, case = world["root"], world["cases"]["activation"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [sys.executable, "-m", "megatron_prune", "prune", "--load", str(root / "gqa-tp1"), "--target-params",
              "60%", "--width-multiple", "8", "--search-candidates", "2", "--importance", "activation",
              "--calib-data", case["calib"]["data"], "--tokenizer", case["calib"]["tokenizer"],
              "--calib-seq-length", "32", "--calib-samples", "4", "--no-progress"]
    hf_to_megatron(root / "gqa", root / "gqa-tp1", tp=1, progress=False)
    ok = subprocess.run(common + ["--save", str(tmp_path / "ok"), "--search-eval-samples", "2"],
                        capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    table = ok.stdout.splitlines()
    assert any(line.split()[:6] == ["rank", "shape", "params", "damage", "loss", "chosen"] for line in table)
    assert sum(line.rstrip().endswith("*") for line in table) == 1
    assert table[0].startswith("budget ") and "valid shapes HF transformers loads" in table[0]
    assert table[1].startswith("evaluated: the 2 of ") and "lowest damage estimate" in table[1]
    bad = subprocess.run(common + ["--save", str(tmp_path / "bad"), "--search-eval-samples", "5000"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "--search-eval-samples" in bad.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "bad").exists()
