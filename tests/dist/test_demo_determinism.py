"""The demo's recovery stage is deterministic for a given seed (issue 23): run twice through the demo's own stage
function (the `train` CLI under torchrun, distillation, 2 data-parallel ranks) on a tiny LLaMA, once as on a
2-core machine and once as on a 16-core machine that is busy (a CPU-burning process beside it, the caller's
OMP_NUM_THREADS and torch kernel choice set otherwise): every iteration's losses and gradient norm, the validation
losses and the trained weights must be identical. (On an AVX-512 CPU, unpinned kernels fail this test.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_prune.checkpoint import megatron_io as mio
from megatron_prune.demo import pipeline, stages

pytestmark = [pytest.mark.dist, pytest.mark.slow]  # two recovery stages
SAMPLES = Path(__file__).resolve().parents[2] / "megatron_prune" / "data" / "samples"
PLAN = stages.DemoPlan(tp=1, train_iters=6, seq_length=32, global_batch=8, lr=3e-3, eval_iters=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    from transformers import AutoTokenizer

    from megatron_prune.checkpoint.convert_files import hf_to_megatron
    from tests.helpers import make_hf_model, save_tiny_tokenizer

    root = tmp_path_factory.mktemp("determinism")
    for name, seed, layers in (("student", 0, 2), ("teacher", 1, 3)):
        save_tiny_tokenizer(root / f"{name}_hf")
        vocab = len(AutoTokenizer.from_pretrained(root / f"{name}_hf"))
        make_hf_model(root / f"{name}_hf", seed=seed, vocab_size=vocab, num_hidden_layers=layers)
        hf_to_megatron(root / f"{name}_hf", root / name, tp=1, progress=False)
    data = stages.preprocess(SAMPLES / "train.jsonl", root / "student_hf", root / "data" / "train", root / "log")
    return {"root": root, "data": data}


def recover(tiny: dict, name: str) -> tuple[list[dict], dict[str, torch.Tensor]]:
    root = tiny["root"]
    stages.train(root / "student", root / "teacher", tiny["data"], root / "student_hf", root / name, PLAN,
                 root / "log")
    records = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    keys = ("kind", "iteration", "lm_loss", "kd_loss", "grad_norm", "teacher_lm_loss", "student_lm_loss")
    weights = mio.load_rank(root / name, 0, 0, mio.read_meta(root / name))["model"]
    return [{k: r[k] for k in keys if k in r} for r in records], weights


def test_recovery_stage_is_identical_under_other_cores_threads_and_load(tiny, monkeypatch):
    flags = pipeline.cpu_flags()
    if "avx2" in flags:  # as on a CPU without AVX-512
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    first, first_weights = recover(tiny, "run1")
    monkeypatch.setattr(os, "cpu_count", lambda: 16)  # the demo once derived thread counts from this
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    if "avx512f" in flags:  # torch's own choice on an AVX-512 CPU
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx512")
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        second, second_weights = recover(tiny, "run2")
    finally:
        burner.kill()
        burner.wait()
    assert [r["iteration"] for r in first if r["kind"] == "train"][-1] == PLAN.train_iters
    assert first[-1]["kind"] == "final" and "teacher_lm_loss" in first[-1]
    assert first == second  # exact: every loss and gradient norm, bit for bit
    assert first_weights.keys() == second_weights.keys()
    for key, value in first_weights.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, second_weights[key]), key
