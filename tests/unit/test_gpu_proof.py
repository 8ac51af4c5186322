"""The GPU proof kit's CPU side: `bash benchmarks/gpu_proof.sh --dry-run` (as CI runs it), its wheel checks, and
the numbers it reports from training metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_proof.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_proof_tasks as tasks  # noqa: E402


def dry_run(wheels: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "WHEELS": str(wheels),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", *extra], cwd=ROOT, env=env, capture_output=True,
                          text=True)


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_dry_run_passes_on_a_clean_checkout(tmp_path):
    r = dry_run(tmp_path / "no-wheels-here")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "absent: run `make gpu-wheels`" in r.stdout
    for stage in ("install", "parity", "train-local", "train-te", "prune", "kd"):
        assert f"stage {stage:<13} arguments ok" in r.stdout
    assert r.stdout.rstrip().endswith("dry run: ok")


def test_dry_run_rejects_a_bad_stage_argument(tmp_path):
    r = dry_run(tmp_path / "none", "--seq-length", "0")
    assert r.returncode == 1
    assert "stage train-local   FAILED: train: " in r.stdout and "--seq-length" in r.stdout


def _wheel_folder(path: Path, files: list[str], listed: list[str]) -> Path:
    path.mkdir()
    for name in files:
        (path / name).write_bytes(b"")
    (path / tasks.MANIFEST).write_text("\n".join(listed) + "\n")
    return path


GOOD = ["megatron_prune-0.1.0-py3-none-any.whl", "megatron_core-0.19.2-cp312-cp312-manylinux_2_28_x86_64.whl",
        "transformers-5.24.0-py3-none-any.whl", "safetensors-0.8.0-cp310-abi3-manylinux2014_x86_64.whl",
        "psutil-7.2.2-cp36-abi3-manylinux2010_x86_64.manylinux_2_12_x86_64.manylinux_2_28_x86_64.whl",
        "defusedxml-0.7.1-py2.py3-none-any.whl"]


def test_wheel_check_accepts_a_complete_folder(tmp_path):
    assert tasks.check_wheels(_wheel_folder(tmp_path / "w", GOOD, GOOD)) == []


def test_wheel_check_names_missing_and_unusable_wheels(tmp_path):
    bad = "numpy-2.5.5-cp311-cp311-manylinux_2_28_x86_64.whl"
    folder = _wheel_folder(tmp_path / "w", GOOD[1:] + [bad], GOOD + [bad])
    problems = tasks.check_wheels(folder)
    assert any(p.startswith(str(folder / GOOD[0])) and "missing" in p for p in problems)
    assert any(p.startswith(str(folder / bad)) and "not installable" in p for p in problems)
    r = dry_run(folder)
    assert r.returncode == 1 and "2 problem(s)" in r.stdout


def test_wheel_check_without_manifest(tmp_path):
    (tmp_path / "w").mkdir()
    manifest = tmp_path / "w" / tasks.MANIFEST
    assert tasks.check_wheels(tmp_path / "w") == [f"{manifest}: missing (rerun `make gpu-wheels`)"]


@pytest.mark.parametrize("name,bundled", [("torch", True), ("triton", True), ("nvidia-cublas", True),
                                          ("nvidia_nccl_cu13", True), ("cuda-bindings", True),
                                          ("megatron-core", False), ("transformers", False), ("torchvision", False)])
def test_torch_bundle_is_not_gathered(name, bundled):
    assert tasks.bundled_with_torch(name) is bundled


def test_training_summary_uses_steps_after_warmup(tmp_path):
    records = [{"kind": "train", "iteration": i, "lm_loss": 10.0 - i, "tokens_per_s": tps, "tflops_per_device": tf,
                "mfu": tf / 989.0, "step_time_s": 32768 / tps, "mem_max_allocated_gib": 50.0 + i}
               for i, tps, tf in [(1, 1000.0, 1.0), (2, 2000.0, 2.0), (3, 30000.0, 300.0), (4, 31000.0, 310.0),
                                  (5, 29000.0, 290.0)]]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    from gpu_proof import summarize_training

    s = summarize_training(tmp_path / "m.jsonl", warmup=2)
    assert s["steps_timed"] == 3
    assert s["tokens_per_s"] == 30000.0 and s["tflops_per_device"] == 300.0
    assert s["mfu"] == pytest.approx(300.0 / 989.0)
    assert (s["lm_loss_first"], s["lm_loss_last"], s["mem_max_allocated_gib"]) == (9.0, 5.0, 55.0)


def test_train_accepts_use_te():
    import argparse

    from megatron_prune.cli import train as cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    base = ["--load", "x", "--data-path", "d", "--train-iters", "1", "--no-save"]
    assert cli.build_config(p.parse_args([*base, "--use-te"])).use_te is True
    assert cli.build_config(p.parse_args(base)).use_te is False


@pytest.mark.parametrize("device,peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                         ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200", 989.0),
                                         ("NVIDIA GH200 480GB", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                         ("NVIDIA L40S", 362.0), ("NVIDIA L40", 181.0), ("NVIDIA L4", 121.0),
                                         ("NVIDIA GeForce RTX 4090", None)])
def test_bf16_peak_by_device_name(device, peak):
    """Dense bf16 peaks from the vendors' data sheets (the MFU denominator)."""
    from megatron_prune.train.metrics import peak_tflops_for

    assert peak_tflops_for(device) == peak


def test_run_records_failures_skips_dependents_and_writes_one_results_file(tmp_path):
    """The runner itself, on stand-in stages: numbers from a JSON line, a failure with its log tail, a stage
    skipped because it needs the failed one, the TE stage skipped without TE, exit code 1."""
    import argparse

    import gpu_proof as kit

    py = sys.executable
    say = lambda obj: [py, "-c", f"import json; print(json.dumps({obj!r}))"]  # noqa: E731
    stages = [kit.Stage("env", say({"te_ok": False}), 30, numbers=lambda o, w: kit.last_json(o)),
              kit.Stage("bad", [py, "-c", "import sys; sys.exit('broken on purpose')"], 30),
              kit.Stage("after-bad", [py, "-c", "pass"], 30, needs=("bad",)),
              kit.Stage("te", [py, "-c", "pass"], 30, requires_te=True),
              kit.Stage("fine", say({"x": 1.5}), 30, needs=("env",), numbers=lambda o, w: kit.last_json(o))]
    out = tmp_path / "out" / "results.md"
    opts = argparse.Namespace(out=str(out), work=str(tmp_path / "work"), budget_s=300, argv=["--x"])
    assert kit.run_all(opts, stages) == 1
    text = out.read_text()
    assert "| bad | failed |" in text and "exit 1: broken on purpose" in text
    assert "| after-bad | skipped | 0.0 | needs bad |" in text
    assert f"| te | skipped | 0.0 | {kit.NO_TE} |" in text
    assert "| fine | ok |" in text and "x 1.5" in text
    raw = json.loads(text.split("```json")[1].split("```")[0])
    assert [s["status"] for s in raw["stages"]] == ["ok", "failed", "skipped", "skipped", "ok"]
    assert "broken on purpose" in (out.parent / "logs" / "bad.log").read_text()
