"""The pruner's distributed write keeps the error contract (issue 19): a programming error inside any rank's
write (or rank 0's finalize) keeps its traceback and exits 1; the user's own problem (a full disk) is one line,
exit 2; either way nothing is left at --save, not even a temporary sibling."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_prune.checkpoint.convert_files import hf_to_megatron
from tests.helpers import make_hf_model

pytestmark = pytest.mark.dist
REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
       "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def tp2(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("write")
    make_hf_model(root / "hf", num_hidden_layers=2)
    hf_to_megatron(root / "hf", root / "tp2", tp=2, progress=False)
    return root / "tp2"


def prune_with(mode: str, load: Path, save: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_prune.cli.launch", "--standalone", "--nproc-per-node", "2",
                           "-m", "tests.dist.prune_write_cases", mode, "--load", str(load), "--save", str(save),
                           "--ffn-hidden-size-remain", "48", "--importance", "magnitude", "--no-progress"],
                          capture_output=True, text=True, timeout=600, env=ENV, cwd=REPO)


def assert_nothing_written(save: Path) -> None:
    assert not save.exists() and not [p.name for p in save.parent.iterdir() if p.name.startswith(f".{save.name}.")]


@pytest.mark.parametrize("mode, rank", [("rank1-bug", 1), ("rank0-finalize-bug", 0)])
def test_a_programming_error_in_the_write_keeps_its_traceback(tp2, tmp_path, mode, rank):
    out = prune_with(mode, tp2, tmp_path / "out")
    assert out.returncode == 1, out.stderr[-3000:]
    assert out.stderr.count("Traceback (most recent call last)") == 1, out.stderr[-3000:]
    assert "KeyError: 'internal'" in out.stderr and f"rank {rank}:" in out.stderr, out.stderr[-3000:]
    assert not [line for line in out.stderr.splitlines() if line.startswith("error:")], out.stderr[-3000:]
    assert_nothing_written(tmp_path / "out")


def test_a_full_disk_on_rank_1_is_one_line(tp2, tmp_path):
    out = prune_with("rank1-disk-full", tp2, tmp_path / "out")
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1, out.stderr[-3000:]
    assert "No space left on device" in errors[0] and "model_optim_rng.pt" in errors[0], errors
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert_nothing_written(tmp_path / "out")
