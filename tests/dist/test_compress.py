"""`compress` end to end on a tiny model at TP=2, through scripts/compress.sh (variables and flags): the final HF
model loads in transformers with the reported parameter count; the reported held-out losses equal transformers'
own evaluation of each model; a rerun redoes nothing; a changed --train-iters redoes training, export and
evaluation only. One job is shared by the assertions (a module fixture); the SIGKILL-resume test is slow."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import make_hf_model, save_tiny_tokenizer

# one shared job of three runs (about 4 minutes on an idle 2-core machine; it took over 10 on a loaded one)
# slow: three compress runs of a tiny model (minutes on 2 cores); tests/unit/test_compress_checks.py stays in the
# default suite
pytestmark = [pytest.mark.dist, pytest.mark.slow, pytest.mark.timeout(3600)]
ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "megatron_prune" / "data" / "samples"
SEQ, EVAL_TOKENS = 32, 512
# tiny-model settings: widths on a grid of 8, short calibration windows, a quick search
PRUNE_ARGS = "--width-multiple 8 --calib-samples 8 --calib-seq-length 64 --search-eval-samples 4 --search-candidates 2"


def make_inputs(root: Path) -> dict[str, Path]:
    hf = root / "hf"
    make_hf_model(hf, seed=2, num_attention_heads=8, num_key_value_heads=4)
    save_tiny_tokenizer(hf)
    lines = (SAMPLES / "train.jsonl").read_text().splitlines()
    (root / "train.jsonl").write_text("\n".join(lines[:12]) + "\n")
    heldout = json.loads((SAMPLES / "heldout.jsonl").read_text().splitlines()[0])["text"]
    (root / "eval.txt").write_text(heldout[:3000])
    return {"hf": hf, "train": root / "train.jsonl", "eval": root / "eval.txt"}


def compress(inputs: dict[str, Path], out: Path, iters: int = 2, train_args: str = "--log-interval 1",
             extra: tuple[str, ...] = (), **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    """scripts/compress.sh with some settings as variables and the others as flags (`extra`: more flags, which
    win over the variables)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "HF_DIR": str(inputs["hf"]),
           "TARGET_PARAMS": "50%", "TP": "2", "TRAIN_ITERS": str(iters), "PRUNE_ARGS": PRUNE_ARGS}
    cmd = ["bash", str(ROOT / "scripts" / "compress.sh"), "--save", str(out), "--train-data", str(inputs["train"]),
           "--eval-data", str(inputs["eval"]), "--calib-data", str(inputs["train"]), "--seq-length", str(SEQ),
           "--global-batch-size", "4", "--eval-max-tokens", str(EVAL_TOKENS), "--train-args", train_args, *extra]
    if popen:
        return subprocess.Popen(cmd, env=env, **popen)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def snapshot(out: Path) -> dict[str, tuple[int, str]]:
    """Every file under OUT/stages: (mtime_ns, sha256)."""
    return {str(p.relative_to(out)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted((out / "stages").rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("compress")
    inputs = make_inputs(root)
    out = root / "out"
    compress(inputs, out)
    first, first_report = snapshot(out), json.loads((out / "report.json").read_text())
    again = compress(inputs, out)
    second = snapshot(out)
    changed = compress(inputs, out, iters=3)
    return {"inputs": inputs, "out": out, "first": first, "first_report": first_report, "again": again,
            "second": second, "third": snapshot(out), "changed": changed,
            "report": json.loads((out / "report.json").read_text())}


def _stage(path: str) -> str:
    return path.split("/")[1].split("-", 1)[1]   # stages/04-train/... -> train


def test_outputs_and_the_final_model_loads_with_the_reported_size(job):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, report = job["out"], job["report"]
    assert {"hf", "report.json", "report.md", "recipe.yaml", "loss.png"} <= {p.name for p in out.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(out / "hf")
    assert sum(p.numel() for p in model.parameters()) == report["models"]["recovered"]["params"]
    AutoTokenizer.from_pretrained(out / "hf")
    original = report["models"]["original"]["params"]
    assert 0.95 * original / 2 <= report["models"]["pruned"]["params"] <= original / 2
    names = [s["name"] for s in report["stages"]]
    assert names == ["01-convert", "02-preprocess", "03-prune", "04-train", "05-export", "06-eval", "07-publish"]
    assert all(s["seconds"] > 0 and s["peak_rss_gib"] > 0 for s in report["stages"] if s["name"] != "07-publish")
    assert "| recovered |" in (out / "report.md").read_text()


def _transformers_loss(model_dir: Path, text: str) -> float:
    """Mean next-token loss over non-overlapping windows of SEQ + 1 tokens (BOS first), as transformers computes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    ids = ids[:EVAL_TOKENS + 1]
    n = (len(ids) - 1) // SEQ
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    losses = []
    with torch.no_grad():
        for i in range(n):
            w = torch.tensor(ids[i * SEQ:(i + 1) * SEQ + 1])[None]
            logits = model(w[:, :-1]).logits
            losses.append(torch.nn.functional.cross_entropy(logits[0], w[0, 1:]).item())
    return sum(losses) / len(losses)


def test_reported_losses_equal_transformers_on_each_exported_model(job):
    assert_losses_equal_transformers(job["report"], job["inputs"], job["out"] / "stages" / "05-export")


def assert_losses_equal_transformers(report: dict, inputs: dict[str, Path], export: Path) -> None:
    """The report's loss, perplexity and token count of each model = transformers' own evaluation of it: the
    source HF model, the export stage's pruned-hf and the published OUT/hf."""
    text = inputs["eval"].read_text()
    exported = {"original": inputs["hf"], "pruned": export / "pruned-hf", "recovered": Path(report["hf"])}
    for name, model_dir in exported.items():
        measured = _transformers_loss(model_dir, text)
        reported = report["models"][name]
        assert abs(reported["loss"] - measured) <= 1e-4 * measured, (name, reported["loss"], measured)
        assert abs(reported["perplexity"] - torch.tensor(measured).exp().item()) <= 1e-3 * reported["perplexity"]
        assert reported["tokens"] == (EVAL_TOKENS // SEQ) * SEQ
    assert report["models"]["recovered"]["loss"] != report["models"]["pruned"]["loss"]  # training changed it


def test_rerun_redoes_nothing(job):
    assert job["second"] == job["first"]
    assert job["again"].stderr.count("done before, kept") == 7, job["again"].stderr[-3000:]
    assert ": start (" not in job["again"].stderr


def test_changed_train_iters_redoes_training_export_and_evaluation_only(job):
    first, third = job["first"], job["third"]
    kept = {p for p in first if _stage(p) in ("convert", "preprocess", "prune")}
    assert kept and all(third[p] == first[p] for p in kept)
    redone = {_stage(p) for p in first if p not in third or third[p] != first[p]}
    assert redone == {"train", "export", "eval", "publish"}, redone
    lines = [line for line in job["changed"].stderr.splitlines() if "changed since the last run" in line]
    assert lines == ["[compress] 04-train: changed since the last run (--train-iters 2 -> 3): redoing it and the 3 "
                     "stages after it"], lines
    assert job["report"]["models"]["original"] == job["first_report"]["models"]["original"]
    assert job["report"]["models"]["pruned"] == job["first_report"]["models"]["pruned"]


def test_recipe_reproduces_the_run(job):
    import yaml

    recipe = yaml.safe_load((job["out"] / "recipe.yaml").read_text())
    assert recipe["train_iters"] == 3 and recipe["target_params"] == "50%" and recipe["tp"] == 2
    assert recipe["prune_args"] == PRUNE_ARGS.split()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(["bash", str(ROOT / "scripts" / "compress.sh"), "--config", str(job["out"] / "recipe.yaml")],
                         env=env, capture_output=True, text=True)
    assert res.returncode == 0 and res.stderr.count("done before, kept") == 7, res.stderr[-3000:]


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.slow
def test_sigkill_during_training_resumes_to_the_uninterrupted_result(tmp_path):
    inputs = make_inputs(tmp_path)
    args = "--log-interval 1 --save-interval 1 --fp32"
    compress(inputs, tmp_path / "whole", iters=4, train_args=args)
    out = tmp_path / "killed"
    proc = compress(inputs, out, iters=4, train_args=args, start_new_session=True, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)
    tracker = out / "stages" / "04-train" / "ckpt" / "latest_checkpointed_iteration.txt"
    while proc.poll() is None and not tracker.is_file():
        time.sleep(0.2)
    assert proc.poll() is None, "the job ended before its first training checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = int(tracker.read_text())
    assert saved < 4
    res = compress(inputs, out, iters=4, train_args=args)
    log = (out / "stages" / "04-train" / "log.txt").read_text()
    assert f"training iterations {saved + 1}..4" in log, log[-3000:]
    assert "04-train: start" in res.stderr and "03-prune: done before, kept" in res.stderr
    whole, resumed = _tensors(tmp_path / "whole" / "hf"), _tensors(out / "hf")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
