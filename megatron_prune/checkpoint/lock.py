"""One writer per output: an exclusive, non-blocking `fcntl.flock` on a lock file, released on exit.

    with output_lock(save, inside=True):    # train: SAVE/.megatron_prune.lock (SAVE is created)
    with output_lock(save):                 # whole-directory writers (prune, convert, reshard): the sibling
                                            # PARENT/.NAME.megatron_prune.lock, because SAVE itself is replaced
                                            # by a rename and must stay empty until then

A second run on the same output is refused at once with `error: SAVE is locked by host H pid P (another run
writes it)`. A whole-directory writer also refuses while a training holds SAVE's inner lock. The kernel drops
the lock when its process dies (even by SIGKILL), so a stale file never blocks anyone; it is removed on a clean
release. Locks are advisory: they stop our own tools, not `rm`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path
from typing import Iterator

from megatron_prune.checkpoint.siblings import sibling_stem
from megatron_prune.errors import UserError

LOCK_NAME = ".megatron_prune.lock"


class OutputLockedError(UserError):
    """Another run holds the output's lock."""


def lock_path(save: str | Path, inside: bool) -> Path:
    save = Path(save).absolute()
    return save / LOCK_NAME if inside else save.parent / f".{sibling_stem(save.name)}{LOCK_NAME}"


@contextlib.contextmanager
def output_lock(save: str | Path, inside: bool = False) -> Iterator[Path]:
    """Hold the lock of `save` for the duration of the block; raises OutputLockedError when taken."""
    save = Path(save)
    created = inside and not save.exists()
    path = lock_path(save, inside)
    if not inside:
        _refuse_if_held(save, lock_path(save, inside=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(save, path)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still held: a waiting opener then re-opens a fresh file (see _acquire)
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                save.rmdir()  # only if the run wrote nothing into the directory it created


def _acquire(save: Path, path: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise OutputLockedError(f"{save} is locked by {holder} (another run writes it; lock file {path})") \
                from None
        # The previous holder may have unlinked the file between our open and our lock: then retry on a new one.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _refuse_if_held(save: Path, inner: Path) -> None:
    """A whole-directory writer would replace SAVE under a training that writes into it: probe its lock."""
    try:
        fd = os.open(inner, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OutputLockedError(f"{save} is locked by {_holder(fd)} (another run writes it; lock file {inner})") \
            from None
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    try:
        host, pid = os.pread(fd, 256, 0).decode().split()[:2]
        return f"host {host} pid {pid}"
    except (OSError, ValueError, UnicodeDecodeError):
        return "another process (holder unknown)"
