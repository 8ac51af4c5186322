"""Training data is an input we never execute, never write into, and check before megatron-core reads it
(issue 26, item 1 and the `.idx`/`.bin` case): the dataset index cache lives in a folder of the run (SAVE/dataset_cache),
a cache file that is not a plain array is refused before megatron-core's `numpy.load(allow_pickle=True)` sees it,
a read-only data folder works, and a truncated or garbage `.idx`/`.bin` is one line before the first batch."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist.test_train_dist import GBS, SEQ, ws  # noqa: F401  (module fixture: tiny converted checkpoints)

pytestmark = pytest.mark.dist
REPO = Path(__file__).resolve().parents[2]


def train(load: Path, save: Path, prefix: Path | str, iters: int = 2) -> subprocess.CompletedProcess:
    args = ["--load", str(load), "--save", str(save), "--data-path", str(prefix), "--split", "98,2,0",
            "--micro-batch-size", "2", "--global-batch-size", str(GBS), "--seq-length", str(SEQ),
            "--train-iters", str(iters), "--lr", "3e-3", "--fp32", "--eval-iters", "0", "--log-interval", "1"]
    return subprocess.run([sys.executable, "-m", "megatron_prune", "train", *args], capture_output=True, text=True,
                          timeout=600, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})


def copy_dataset(prefix: str, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for ext in (".bin", ".idx"):
        shutil.copy(prefix + ext, folder / ("data" + ext))
    return folder / "data"


class _Planted:
    """A pickle that, when loaded, creates the marker file: the payload of a planted cache file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def one_error_line(out: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-3000:]
    return lines[0]


def test_a_planted_cache_pickle_never_runs(ws, tmp_path):  # noqa: F811
    """Run once (the index cache is written wherever the product keeps it), replace every cached array, in the data
    folder or the run's, by a pickle that runs `os.system`, run again: refused in one line, the code never ran.
    (Before: megatron-core's cache beside the data was unpickled and the command ran.) The data folder holds
    nothing but the dataset, before and after."""
    prefix = copy_dataset(ws["data"], tmp_path / "data")
    assert train(ws["root"] / "tp1", tmp_path / "run", prefix).returncode == 0
    cached = sorted(tmp_path.rglob("*.npy"))
    marker = tmp_path / "code-ran"
    for p in cached:
        p.write_bytes(pickle.dumps(_Planted(marker)))
    out = train(ws["root"] / "tp1", tmp_path / "run", prefix)
    assert not marker.exists(), "a cache file planted in the data folder or the run's ran its code"
    line = one_error_line(out)
    assert "dataset_cache" in line and "not a plain .npy array" in line, line
    assert cached and all(p.parent == tmp_path / "run" / "dataset_cache" for p in cached), cached
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["data.bin", "data.idx"]


def test_read_only_data_folder_trains(ws, tmp_path):  # noqa: F811
    """The data folder is an input: nothing is written into it, so a read-only one works (before: megatron-core
    wrote its index cache beside the data, and failed with a 45-line traceback on a read-only file system)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        prefix = copy_dataset(ws["data"], folder)
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        out = train(ws["root"] / "tp1", tmp_path / "run", prefix)
        assert out.returncode == 0, out.stderr[-3000:]
        assert sorted(p.name for p in folder.iterdir()) == ["data.bin", "data.idx"]
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_truncated_bin_is_one_line_before_training(ws, tmp_path):  # noqa: F811
    """Was: a 41-line traceback at the first batch (`offset must be non-negative ...`)."""
    prefix = copy_dataset(ws["data"], tmp_path / "data")
    with open(f"{prefix}.bin", "r+b") as f:
        f.truncate(1000)
    out = train(ws["root"] / "tp1", tmp_path / "run", prefix)
    line = one_error_line(out)
    assert f"{prefix}.bin: 1000 bytes" in line and "truncated" in line, line
    assert not (tmp_path / "run").exists()
