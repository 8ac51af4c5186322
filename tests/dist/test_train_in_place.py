"""`train --load X --save X` (Megatron-LM's resume idiom): works run after run, and the meta a reader gets always
describes the tensors of the iteration the tracker names (issue 12, item 2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_prune.checkpoint import megatron_io as mio
from tests.dist.test_train_dist import GBS, SEQ, ws  # noqa: F401  (module fixture: tiny converted checkpoints)

pytestmark = pytest.mark.dist


def train_cli(ckpt: Path, data: str, iters: int, *extra: str) -> subprocess.CompletedProcess:
    """The user's command in bf16 (the GPU default; CPU's is fp32), one process."""
    args = ["--load", str(ckpt), "--save", str(ckpt), "--data-path", data, "--split", "98,2,0", "--bf16",
            "--micro-batch-size", "2", "--global-batch-size", str(GBS), "--seq-length", str(SEQ),
            "--train-iters", str(iters), "--lr", "3e-3", "--eval-iters", "0", "--log-interval", "1", *extra]
    return subprocess.run([sys.executable, "-m", "megatron_prune", "train", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})


def tensor_dtypes(rank_file: Path) -> set[str]:
    """Dtypes of the weight matrices (norm vectors stay fp32 in megatron-core's CPU training)."""
    sd = torch.load(rank_file, map_location="cpu", weights_only=True)["model"]
    return {str(v.dtype).removeprefix("torch.") for v in sd.values() if isinstance(v, torch.Tensor) and v.dim() == 2}


@pytest.mark.slow  # extending a run in place (the next test) covers the same path
def test_training_in_place_twice(ws, tmp_path):  # noqa: F811
    ckpt = tmp_path / "x"
    shutil.copytree(ws["root"] / "tp1", ckpt)
    release = ckpt / "release" / "mp_rank_00" / mio.RANK_FILE
    release_bytes = release.read_bytes()
    for iters in (4, 8):
        out = train_cli(ckpt, ws["data"], iters)
        assert out.returncode == 0, out.stderr[-3000:]
        assert (ckpt / mio.TRACKER).read_text().strip() == str(iters)
        trained = ckpt / mio.iteration_dir_name(iters) / "mp_rank_00" / mio.RANK_FILE
        assert tensor_dtypes(trained) == {"bfloat16"}
        meta = mio.read_meta(ckpt)
        assert meta.shape.dtype == "bfloat16" and meta.history[-1]["iteration"] == iters
        assert json.loads((ckpt / mio.META).read_text())["iteration"] == iters
    assert release.read_bytes() == release_bytes
    assert tensor_dtypes(release) == {"float32"}
    # A tracker that names `release` (as after a crash before the first commit) reads release's own meta.
    (ckpt / mio.TRACKER).write_text("release")
    meta = mio.read_meta(ckpt)
    assert meta.shape.dtype == "float32" and all(h["op"] != "train" for h in meta.history)


def test_root_meta_of_another_iteration_is_refused(ws, tmp_path):  # noqa: F811
    """A root meta that names another iteration than the tracker, with no per-iteration copy: refused."""
    from megatron_prune.checkpoint.errors import CheckpointError

    ckpt = tmp_path / "y"
    shutil.copytree(ws["root"] / "tp1", ckpt)
    meta = mio.read_meta(ckpt)
    mio.write_meta(ckpt, meta.replace(shape=meta.shape.replace(dtype="bfloat16")), iteration=4)
    with pytest.raises(CheckpointError, match="describes iteration 4"):
        mio.read_meta(ckpt)


def test_extending_a_run_decays_to_the_new_end(ws, tmp_path):  # noqa: F811
    """`--train-iters 12`, then the same command with 16: the new iterations follow the schedule of a 16-iteration
    run (cosine from the warm-up to iteration 16, Megatron-LM's formula written out here), and the run says once
    that it replaced the checkpoint's schedule. Before: the checkpoint's 12-iteration schedule won, and
    iterations 13-16 trained at lr 0."""
    import math

    ckpt = tmp_path / "x"
    shutil.copytree(ws["root"] / "tp1", ckpt)
    extra = ["--lr-warmup-iters", "2", "--lr-decay-style", "cosine", "--min-lr", "0"]
    first = train_cli(ckpt, ws["data"], 12, *extra)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "learning-rate schedule" not in first.stdout + first.stderr
    out = train_cli(ckpt, ws["data"], 16, *extra)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(ln) for ln in (ckpt / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["iteration"]: r["lr"] for r in records if r.get("kind") == "train"}
    for it in range(13, 17):
        step, warmup, end = it - 1, 2, 16  # the rate iteration `it` uses: after it - 1 iterations
        expected = 3e-3 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (end - warmup)))
        assert lrs[it] > 0 and lrs[it] == pytest.approx(expected, rel=1e-6), (it, lrs)
    said = [ln for ln in out.stdout.splitlines() if "learning-rate schedule" in ln]
    assert said == ["resuming iteration 12 with this run's learning-rate schedule, not the checkpoint's: "
                    "decay iterations 12 -> 16"], out.stdout[-3000:]
