"""Safe writes: every output is built in a temporary sibling, fsynced, and renamed into place at the end.

- `check_output_dir` is the one check every writing command runs before any work: the output must not be,
  contain, or lie inside any input (resolved paths, symlinks followed), and an existing non-empty output needs
  `--overwrite`. It also removes temporary siblings left by dead processes.
- `atomic_dir` / `atomic_file` write to `.NAME.tmp-HOST-PID`, fsync, rename (then fsync the parent directory), and
  remove their partial output on any failure. OS errors while writing become one-line `WriteError`s
  ("no space left on device writing PATH ...", "cannot write PATH: read-only file system").
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import re
import shutil
import socket
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

from megatron_prune.checkpoint.siblings import sibling_stem
from megatron_prune.errors import UserError

GiB = 2**30
_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:40] or "host"
# `.NAME.tmp-PID` (older runs), `.NAME.tmp-HOST-PID`, `.NAME.old-HOST-PID`, and `NAME.tmp-PID` (preprocess)
# The temporary directory an atomic_dir is building: files written into it are fsynced once, together, before it
# is published (fsync per file would make each rank file wait for its own write-back: +14% on a 7B reshard).
_BUILDING: contextvars.ContextVar[Path | None] = contextvars.ContextVar("megatron_prune_building", default=None)
_TEMP_RE = re.compile(r"^(?P<name>.+?)\.(?:tmp|old)-(?:(?P<host>[A-Za-z0-9_.]+)-)?(?P<pid>\d+)$")


class OutputExistsError(UserError, FileExistsError):
    pass


class OverlapError(UserError, ValueError):
    """An output path that is, contains, or lies inside an input."""


class WriteError(UserError, OSError):
    """Writing the output failed for a reason of the environment (full disk, read-only file system ...)."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno N]" prefix
        return self.strerror or super().__str__()


def human_size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.2f} MiB"


def temp_name(name: str, kind: str = "tmp") -> str:
    """The hidden sibling name used while `name` is being written (host + pid: stale ones can be recognised;
    a very long `name` is shortened so that the sibling stays a legal file name, checkpoint/siblings.py)."""
    return f".{sibling_stem(name)}.{kind}-{_HOST}-{os.getpid()}"


# ---------------------------------------------------------------------------------------------------- checks
def check_output_dir(save: str | Path, overwrite: bool, *, inputs: Mapping[str, str | Path | None]
                     | Iterable[str | Path | None] = ()) -> Path:
    """The shared pre-flight check of every command that writes `save`. `inputs`: {flag: path} (or paths) it reads."""
    save = Path(save)
    check_no_overlap(save, inputs)
    remove_stale_temps(save)
    _check_existing(save, overwrite)
    return save


def _check_existing(save: Path, overwrite: bool) -> None:
    if save.exists() and not save.is_dir():
        raise OutputExistsError(f"{save}: exists and is not a directory")
    if save.is_dir() and any(save.iterdir()) and not overwrite:
        raise OutputExistsError(f"{save}: exists and is not empty (pass --overwrite to replace it)")


def check_no_overlap(output: str | Path, inputs: Mapping[str, str | Path | None] | Iterable[str | Path | None],
                     what: str = "--save") -> None:
    """Refuse an output equal to, inside, or a parent of any input (after resolving symlinks)."""
    named = inputs.items() if isinstance(inputs, Mapping) else ((None, p) for p in inputs)
    out = Path(output).expanduser().resolve()
    for flag, path in named:
        if path is None or str(path) == "":
            continue
        src = Path(path).expanduser().resolve()
        label = f"{flag} {path}" if flag else f"input {path}"
        if out == src:
            relation = "is"
        elif src in out.parents:
            relation = "is inside"
        elif out in src.parents:
            relation = "contains"
        else:
            continue
        raise OverlapError(f"{what} {output} {relation} {label}: the output must be a separate path "
                           "(an input is never written into, over, or above)")


def remove_stale_temps(target: str | Path) -> list[Path]:
    """Remove temporary siblings of `target` left by dead processes on this host; say so on stderr."""
    target = Path(target).expanduser().resolve()
    parent = target.parent
    if not parent.is_dir():
        return []
    removed = []
    for entry in parent.iterdir():
        m = _TEMP_RE.match(entry.name)
        if not m or m["name"].lstrip(".") not in (target.name, sibling_stem(target.name)) \
                or not _owner_dead(m["host"], int(m["pid"])):
            continue
        _remove(entry)
        removed.append(entry)
        print(f"removed stale temporary {entry} (left by dead process {m['pid']})", file=sys.stderr)
    return removed


def _owner_dead(host: str | None, pid: int) -> bool:
    if host is not None and host != _HOST:
        return False  # another node's write on a shared file system: not ours to judge
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def check_free_space(directory: str | Path, need_bytes: int, path_for_message: str | Path | None = None) -> None:
    """Refuse to start a write of `need_bytes` that the file system cannot hold (5% headroom)."""
    directory = Path(directory).expanduser().resolve()
    probe = next((p for p in (directory, *directory.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    if need_bytes * 1.05 > free:
        raise WriteError(errno.ENOSPC, f"no space left on device writing {path_for_message or directory} "
                         f"(need ~{human_size(need_bytes)}, {human_size(free)} free)")


# ---------------------------------------------------------------------------------------------- error text
def write_error(e: OSError, path: str | Path) -> WriteError:
    """One line for an OS error met while writing `path`."""
    code = e.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        free = _free_bytes(path)
        msg = f"no space left on device writing {path}" + (f" ({human_size(free)} free)" if free is not None else "")
    elif code == errno.EROFS:
        msg = f"cannot write {path}: read-only file system"
    elif code in (errno.EACCES, errno.EPERM):
        msg = f"cannot write {path}: permission denied"
    else:
        msg = f"cannot write {path}: {e.strerror or e}"
    return WriteError(code, msg)


def _free_bytes(path: str | Path) -> int | None:
    p = Path(path)
    for q in (p, *p.parents):
        if q.exists():
            return shutil.disk_usage(q).free
    return None


def _disk_full(path: Path) -> bool:
    free = _free_bytes(path)
    return free is not None and free < 16 * 2**20


@contextlib.contextmanager
def translate_write_errors(path: str | Path) -> Iterator[None]:
    """OS errors (and torch.save's RuntimeError on a full disk) inside the block become one-line WriteErrors."""
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO):
            raise write_error(e, path) from None
        raise
    except RuntimeError as e:  # torch's zip writer reports ENOSPC as "unexpected pos ..." / "file write failed"
        text = str(e)
        if ("unexpected pos" in text or "write failed" in text) and _disk_full(Path(path)):
            raise write_error(OSError(errno.ENOSPC, "No space left on device"), path) from None
        raise


# ---------------------------------------------------------------------------------------------- writing
def fsync_path(path: str | Path) -> None:
    """fsync a file or a directory (a directory's fsync makes the renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (before the rename that publishes it)."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fsync_path(Path(dirpath) / name)
        fsync_path(dirpath)


@contextlib.contextmanager
def atomic_dir(save: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `save`; on success it is fsynced and replaces `save`; on failure it is removed.
    The output's lock is held throughout (a second writer is refused). Callers have run
    `check_output_dir(save, overwrite, inputs=...)` before any work."""
    from megatron_prune.checkpoint.lock import output_lock

    save = Path(save).expanduser().resolve()
    _check_existing(save, overwrite)
    with contextlib.ExitStack() as held:
        with translate_write_errors(save):
            held.enter_context(output_lock(save))
            tmp = save.parent / temp_name(save.name)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        building = _BUILDING.set(tmp)
        try:
            with translate_write_errors(save):
                yield tmp
                fsync_tree(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            _BUILDING.reset(building)
        with translate_write_errors(save):
            swap_into_place(tmp, save)


def swap_into_place(tmp: Path, save: Path) -> None:
    """Rename a finished temporary directory to `save`, replacing (then deleting) any previous `save`."""
    old = None
    if save.exists():
        old = save.parent / temp_name(save.name, "old")
        save.rename(old)
    tmp.rename(save)
    fsync_path(save.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_file(path: str | Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` into a temporary sibling, fsync, rename to `path`, fsync the directory. On failure the
    partial file is removed and the error is a one-line WriteError when the environment caused it."""
    path = Path(path)
    remove_stale_temps(path)  # e.g. a rank file of a training run killed while saving this iteration
    tmp = path.with_name(temp_name(path.name))
    building = _BUILDING.get()
    sync_now = building is None or building.resolve() not in path.resolve().parents  # else atomic_dir syncs all
    try:
        with translate_write_errors(path):
            write(tmp)
            if sync_now:
                fsync_path(tmp)
            os.replace(tmp, path)
            if sync_now:
                fsync_path(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_file(path, lambda tmp: tmp.write_text(text))
