"""checkpoint/lock.py: one writer per output (issue 12, item 7)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from megatron_prune.checkpoint.lock import LOCK_NAME, OutputLockedError, lock_path, output_lock
from megatron_prune.errors import UserError


def test_second_writer_is_refused_with_the_holder(tmp_path):
    save = tmp_path / "out"
    with output_lock(save, inside=True) as path:
        assert path == save / LOCK_NAME and save.is_dir()
        with pytest.raises(OutputLockedError) as err:
            with output_lock(save, inside=True):
                pass
        msg = str(err.value)
        assert msg.startswith(f"{save} is locked by host {socket.gethostname()} pid {os.getpid()}")
        assert "another run writes it" in msg and isinstance(err.value, UserError)
    assert not save.exists()  # created by the lock, nothing written: removed again
    with output_lock(save, inside=True):  # released: taken again at once
        pass


def test_sibling_lock_and_probe_of_a_training_inside(tmp_path):
    save = tmp_path / "out"
    with output_lock(save) as path:
        assert path == lock_path(save, inside=False) and path.parent == tmp_path and not save.exists()
        with pytest.raises(OutputLockedError):
            with output_lock(save):
                pass
    assert not path.exists()
    save.mkdir()
    (save / "keep").write_text("x")
    with output_lock(save, inside=True):  # a training writes into SAVE: a whole-directory writer must not replace it
        with pytest.raises(OutputLockedError, match="is locked by host"):
            with output_lock(save):
                pass
    assert (save / "keep").is_file() and not (save / LOCK_NAME).exists()


def test_lock_of_a_killed_holder_is_free(tmp_path):
    save = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom megatron_prune.checkpoint.lock import output_lock\n"
        "with output_lock(sys.argv[1], inside=True):\n    print('held', flush=True)\n    time.sleep(600)\n"),
        str(save)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputLockedError, match=f"pid {holder.pid}"):
            with output_lock(save, inside=True):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (save / LOCK_NAME).exists()  # left behind by SIGKILL, but the kernel dropped the lock
    with output_lock(save, inside=True):
        pass
