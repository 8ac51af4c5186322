"""One writer per --save, and workers that stop with their launcher (issue 12, item 7)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_prune.checkpoint.lock import LOCK_NAME, output_lock
from tests.dist.test_rank_errors import ENV, REPO, error_lines, train_args
from tests.dist.test_train_dist import ws  # noqa: F401  (module fixture: tiny converted checkpoints)

pytestmark = pytest.mark.dist


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_prune", *args], capture_output=True, text=True,
                          timeout=600, env=ENV, cwd=REPO)


def test_second_train_and_prune_into_a_locked_save_are_refused(ws, tmp_path):  # noqa: F811
    save = tmp_path / "run"
    with output_lock(save, inside=True):  # the first writer (this process)
        out = cli("train", *train_args(ws["root"] / "tp1", save, ws["data"], "--train-iters", "1"))
        assert out.returncode == 2, out.stderr[-3000:]
        assert error_lines(out.stderr) == [f"error: {save} is locked by host {socket.gethostname()} pid {os.getpid()} "
                                           f"(another run writes it; lock file {save / LOCK_NAME})"]
        assert sorted(p.name for p in save.iterdir()) == [LOCK_NAME]  # nothing written
    pruned = tmp_path / "pruned"
    with output_lock(pruned):
        out = cli("prune", "--load", str(ws["root"] / "tp1"), "--save", str(pruned), "--hidden-size-remain", "48",
                  "--no-progress")
        assert out.returncode == 2 and len(error_lines(out.stderr)) == 1, out.stderr[-3000:]
        assert f"{pruned} is locked by host" in out.stderr and not pruned.exists()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state  # a zombie has stopped (its reaper may be slow)


def _wait(pred) -> None:
    while not pred():  # bounded by pytest-timeout, never by a fixed wall-clock limit here
        time.sleep(0.2)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_workers_stop_when_the_launcher_is_killed(ws, tmp_path):  # noqa: F811
    save = tmp_path / "run"
    args = train_args(ws["root"] / "tp1", save, ws["data"], "--train-iters", "100000")
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                 "1", "-m", "megatron_prune", "train", *args], env=ENV, cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = save / LOCK_NAME
    try:
        _wait(lambda: lock.is_file() and len(lock.read_text().split()) == 2 or launcher.poll() is not None)
        assert launcher.poll() is None, "training ended before the test could kill its launcher"
        worker = int(lock.read_text().split()[1])
        _wait(lambda: (save / "metrics.jsonl").is_file())  # in the loop, not in set-up
        assert _alive(worker)
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        _wait(lambda: not _alive(worker))
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
