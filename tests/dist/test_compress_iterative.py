"""`compress --steps 2` with training at another TP than conversion (--tp 2 --train-tp 1) on the tiny model of
test_compress.py: two prune/recover rounds reaching 50% geometrically (round 1 prunes to P0 x sqrt(0.5)), the
round-2 prune reading round 1's *training* checkpoint at the training TP with the drop limits of the source, one
reshard of student and teacher, the rounds' data consecutive; the final HF model loads with the reported size and
the reported losses equal transformers' own evaluation of each exported model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.dist.test_compress import assert_losses_equal_transformers, compress, make_inputs

pytestmark = [pytest.mark.dist, pytest.mark.slow, pytest.mark.timeout(3600)]
ITERS, GBS = 4, 4   # GBS: test_compress.compress's --global-batch-size
STAGES = ["01-convert", "02-preprocess", "03-prune-1", "04-reshard", "05-train-1", "06-prune-2", "07-train-2",
          "08-export", "09-eval", "10-publish"]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("compress_iterative")
    inputs = make_inputs(root)
    out = root / "out"
    res = compress(inputs, out, iters=ITERS, extra=("--tp", "2", "--train-tp", "1", "--steps", "2"))
    records = {d.name: json.loads((d / "stage.json").read_text()) for d in sorted((out / "stages").iterdir())}
    return {"inputs": inputs, "out": out, "stderr": res.stderr, "records": records,
            "report": json.loads((out / "report.json").read_text())}


def _arg(args: list[str], flag: str) -> str:
    return args[len(args) - 1 - args[::-1].index(flag) + 1]   # the last one: argparse's winner


def _meta(ckpt: str):
    from megatron_prune.checkpoint.megatron_io import read_meta

    return read_meta(ckpt)


def test_both_rounds_run_and_the_final_model_loads_with_the_reported_size(job):
    from transformers import AutoModelForCausalLM

    out, report = job["out"], job["report"]
    assert list(job["records"]) == STAGES and [s["name"] for s in report["stages"]] == STAGES
    model = AutoModelForCausalLM.from_pretrained(out / "hf")
    assert sum(p.numel() for p in model.parameters()) == report["models"]["recovered"]["params"]
    md = (out / "report.md").read_text()
    assert all(f"| {name} |" in md for name in STAGES)
    assert [r["round"] for r in report["rounds"]] == [1, 2] and "| 2 | " in md


def test_round_budgets_are_geometric(job):
    report, records = job["report"], job["records"]
    p0 = report["models"]["original"]["params"]
    first, second = report["rounds"]
    assert int(first["target_params"]) == round(p0 * math.sqrt(0.5)) and int(second["target_params"]) == round(p0 / 2)
    for r in (first, second):  # the search's window: 80-100% of the round's target at the widest
        assert 0.8 * int(r["target_params"]) <= r["params"] <= int(r["target_params"]), r
    assert first["params"] > p0 / 2 >= second["params"]
    assert report["models"]["pruned"]["params"] == second["params"] == report["models"]["recovered"]["params"]
    assert [r["train_iters"] for r in (first, second)] == [ITERS // 2, ITERS // 2]


def test_round_two_prunes_the_training_checkpoint_at_the_training_tp(job):
    rec = job["records"]
    prune1, prune2 = rec["03-prune-1"]["commands"][0], rec["06-prune-2"]["commands"][0]
    assert _meta(_arg(prune1, "--save")).tp == 2   # round 1 at the conversion TP
    train1_ckpt = Path(rec["05-train-1"]["outputs"]["ckpt"])
    assert _arg(prune2, "--load") == str(train1_ckpt)
    # what round 2 read: a training checkpoint (iteration directory, optimizer state), at TP 1
    assert (train1_ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(ITERS // 2)
    assert _meta(str(train1_ckpt)).tp == 1
    assert _meta(_arg(prune2, "--save")).tp == 1 and len(rec["06-prune-2"]["results"][0]["peak_rss"]) == 1
    # round 2's drop limits are measured from the source model (4 layers), not from round 1's shape
    assert _arg(prune2, "--limits-of") == str(job["inputs"]["hf"]) and "--limits-of" not in prune1
    search = json.loads((Path(_arg(prune2, "--save")) / "prune_search.json").read_text())
    assert search["space"]["limits_of"]["num_layers"] == 4
    # one reshard, of the round-1 student and of the teacher, to the training TP; both rounds distil from it
    (reshard,) = [r for r in rec.values() if r["kind"] == "reshard"]
    loads = [_arg(c, "--load") for c in reshard["commands"]]
    assert loads == [rec["03-prune-1"]["outputs"]["ckpt"], rec["01-convert"]["outputs"]["ckpt"]]
    assert all(_arg(c, "--tp") == "1" for c in reshard["commands"])
    teacher = reshard["outputs"]["teacher"]
    for name in ("05-train-1", "07-train-2"):
        args = rec[name]["commands"][0]
        assert _arg(args, "--teacher-load") == teacher and _arg(args, "--tp") == "1"
    # round 2's data follows round 1's: it skips the samples round 1 trained on
    assert "--skip-samples" not in rec["05-train-1"]["commands"][0]
    assert _arg(rec["07-train-2"]["commands"][0], "--skip-samples") == str(ITERS // 2 * GBS)


def test_reported_losses_equal_transformers_on_each_exported_model(job):
    assert_losses_equal_transformers(job["report"], job["inputs"], job["out"] / "stages" / "08-export")
