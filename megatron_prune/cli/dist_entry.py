"""The one wrapper of every torchrun entry (prune, train, eval): whichever rank fails, one report, once.

    def run(args) -> int:
        return run_entry(lambda: _run(args))

- A failure found by `model.agree.agree` (checks every rank makes before a collective) is known to all ranks:
  rank 0 prints `error: MESSAGE` for a user error (exit 2 on every rank); a programming error's traceback is
  printed by the rank that raised it (exit 1).
- An error raised later on one rank, while the others may wait in a collective: that rank prints it (one line
  for a user error, its traceback otherwise), leaves a note in the job's error directory and exits at once
  (os._exit), so its peers fail fast with "Connection closed by peer" instead of waiting for a timeout. A peer
  that then fails that way finds the note and exits quietly with the same code.
- A user error that every rank raises identically (`agree.everywhere`, `TrainingAborted`) is printed by rank 0 only.
- Under cli/launch.py a rank that leaves the report to another waits (briefly) until that report is noted, so
  torchrun, which stops all workers once one exits, cannot cut it short.
- Under torchrun, workers stop when their launcher dies (`stop_with_launcher`).

`cli/launch.py` (used by the shell scripts) runs torchrun with the error directory set and replaces torchrun's
traceback wall by the exit code the workers reported.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

from megatron_prune.cli.common import ERROR_DIR_ENV
from megatron_prune.errors import EXIT_BUG, EXIT_USER_ERROR
from megatron_prune.model.agree import RankFailure, is_user_error, one_line
# How a rank's collective fails when a peer process died (gloo, NCCL, the TCP store).
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote process exited",
             "NCCL communicator was aborted", "Socket Timeout", "Connection refused")


def run_entry(body: Callable[[], int]) -> int:
    """body() on this rank; then the process groups are torn down (after any report: a failing rank writes its
    note before its connections close, so peers that lose them know why)."""
    stop_with_launcher()
    try:
        code = int(body() or 0)
    except RankFailure as e:
        code = _report_agreed(e)
    except Exception as e:  # noqa: BLE001 - the one place that turns any failure into one report
        code = _report_local(e)
    from megatron_prune.model.dist import shutdown

    shutdown()
    return code


def hold_output_lock(stack: contextlib.ExitStack, save: str | Path, inside: bool = False) -> None:
    """Rank 0 takes the job's lock on `save` (checkpoint.lock) until `stack` closes; call it through `agree`
    so that a refusal stops every rank with one message."""
    from megatron_prune.checkpoint.lock import output_lock

    if _rank() == 0:
        stack.enter_context(output_lock(save, inside=inside))


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _distributed() -> bool:
    """Other ranks may exist (even once the process group is gone)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _say(text: str) -> None:
    sys.stdout.flush()
    print(text, file=sys.stderr, flush=True)


def _report_agreed(e: RankFailure) -> int:
    """Every rank knows and exits alike (no casualties): the note is only for cli/launch.py's exit code."""
    rank = _rank()
    launched = bool(os.environ.get(ERROR_DIR_ENV))
    reporter = 0 if e.user else e.rank
    if rank == reporter:
        _say(f"error: {e.message}" if e.user else f"rank {rank}: {e.trace or e.message}".rstrip())
        if launched:
            note_error(EXIT_USER_ERROR if e.user else EXIT_BUG, e.message)
    else:
        wait_for_report()
    return EXIT_USER_ERROR if e.user else EXIT_BUG


def _report_local(e: Exception) -> int:
    rank, user = _rank(), is_user_error(e)
    code = EXIT_USER_ERROR if user else EXIT_BUG
    if not _distributed() or getattr(e, "on_every_rank", False):  # one process, or every rank alike: rank 0 says it
        if rank == 0:
            _say(f"error: {one_line(e)}" if user else traceback.format_exc().rstrip())
            if os.environ.get(ERROR_DIR_ENV):  # under cli/launch.py (the shell scripts), even with one process
                note_error(code, one_line(e))
        else:
            wait_for_report()
        return code
    peer = peer_error_code()
    if peer is not None and not user:  # a casualty of a peer that already said what went wrong
        _exit(peer)
    if not user and any(p in str(e) for p in PEER_LOST):
        message = f"rank {rank} lost contact with another rank ({type(e).__name__}: {str(e).splitlines()[0]})"
        _say(f"error: {message}")
    else:
        message = one_line(e)
        _say(f"error: {message}" if user else f"rank {rank}: {traceback.format_exc().rstrip()}")
    note_error(code, message)
    _exit(code)


def _exit(code: int):
    """Leave now: peers blocked in a collective see the closed connection instead of waiting for a timeout,
    and no interpreter shutdown (atexit, process-group teardown) can hang."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ---------------------------------------------------------------------------------------------- error notes
def error_dir() -> Path:
    """Shared by the job's local workers: set by cli/launch.py, else derived from the torchrun agent (parent)."""
    if os.environ.get(ERROR_DIR_ENV):
        return Path(os.environ[ERROR_DIR_ENV])
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    return Path(tempfile.gettempdir()) / f"megatron_prune-errors-{os.getuid()}-{os.getppid()}-{run_id}"


def note_error(code: int, message: str) -> None:
    """`rankR.err`: exit code and message; written before the rank exits (so before its sockets close)."""
    try:
        d = error_dir()
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".rank{_rank()}.tmp"
        tmp.write_text(f"{code}\n{message}\n")
        os.replace(tmp, d / f"rank{_rank()}.err")
    except OSError:
        pass  # the report itself was printed; the note only quiets casualties


def wait_for_report(timeout: float = 10.0) -> None:
    """Under cli/launch.py, a rank that leaves the report to another rank exits only once that report is noted (or
    after `timeout`): torchrun stops the other workers as soon as one exits, which could cut the report short."""
    if not os.environ.get(ERROR_DIR_ENV):
        return
    deadline = time.monotonic() + timeout
    while not read_errors(error_dir()) and time.monotonic() < deadline:
        time.sleep(0.05)


def read_errors(d: Path) -> dict[int, tuple[int, str]]:
    out = {}
    for f in d.glob("rank*.err"):
        try:
            code, message = f.read_text().split("\n", 1)
            out[int(f.stem[4:])] = (int(code), message.strip())
        except (OSError, ValueError):
            continue
    return out


def peer_error_code() -> int | None:
    others = {r: v for r, v in read_errors(error_dir()).items() if r != _rank()}
    return others[min(others)][0] if others else None


# ---------------------------------------------------------------------------------------------- launcher death
PR_SET_PDEATHSIG = 1


def stop_with_launcher() -> None:
    """Under torchrun: end this worker when its launcher (the parent) dies, even by SIGKILL, which gives the
    launcher no chance to stop its workers. prctl(PR_SET_PDEATHSIG) on Linux; a polling thread elsewhere."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_RANK" not in os.environ:
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl")
        if os.getppid() != parent:  # died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)
        return
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="launcher-watchdog", daemon=True).start()
