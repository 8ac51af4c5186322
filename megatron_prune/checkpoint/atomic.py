"""Atomic directory writes: build the output in a temporary sibling and rename it into place at the end.

A failed run leaves nothing at the target (and an existing target untouched unless the run succeeds).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator


class OutputExistsError(FileExistsError):
    pass


def check_output_dir(save: str | Path, overwrite: bool) -> Path:
    save = Path(save)
    if save.exists() and not save.is_dir():
        raise OutputExistsError(f"{save}: exists and is not a directory")
    if save.is_dir() and any(save.iterdir()) and not overwrite:
        raise OutputExistsError(f"{save}: exists and is not empty (pass --overwrite to replace it)")
    return save


@contextlib.contextmanager
def atomic_dir(save: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `save`; on success it replaces `save`, on failure it is removed."""
    save = check_output_dir(save, overwrite).resolve()
    save.parent.mkdir(parents=True, exist_ok=True)
    tmp = save.parent / f".{save.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_into_place(tmp, save)


def swap_into_place(tmp: Path, save: Path) -> None:
    """Rename a finished temporary directory to `save`, replacing (then deleting) any previous `save`."""
    old = None
    if save.exists():
        old = save.parent / f".{save.name}.old-{os.getpid()}"
        save.rename(old)
    tmp.rename(save)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, path)
