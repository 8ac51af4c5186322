"""Writing one checkpoint from every rank, atomically, and keeping a rank's memory small while it does.

    write_distributed(save, write_rank, finalize, overwrite=False, inputs={"--load": load})

- rank 0 checks the output (checkpoint.atomic.check_output_dir) and makes the temporary sibling;
- every rank writes its own file into it (`write_rank(tmp)`);
- rank 0 writes what makes the checkpoint complete (`finalize(tmp)`: meta, tracker last) and swaps it into place.
Each step runs through `agree`: if it fails on any rank, every rank raises the same RankFailure (a user error
stays one line, a programming error keeps its traceback; cli.dist_entry reports it once), rank 0 removes the
temporary directory, and nothing is left at `save`.

PageDropper lets a rank that slices an mmap'd source shard give back each source tensor's pages once it is read.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist

from megatron_prune.checkpoint.atomic import check_output_dir, swap_into_place, temp_name
from megatron_prune.model.agree import agree


def write_distributed(save: str | Path, write_rank: Callable[[Path], None], finalize: Callable[[Path], None], *,
                      overwrite: bool, inputs: Mapping[str, str | Path | None]) -> None:
    """Atomic multi-process write of `save` (see the module docstring); call it on every rank."""
    save = Path(save).resolve()
    rank = dist.get_rank()
    made = agree(_on_rank_0, rank, _make_tmp, save, overwrite, inputs)
    box = [str(made) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)  # the name has rank 0's pid in it
    tmp = Path(box[0])
    try:
        agree(write_rank, tmp)
        agree(_on_rank_0, rank, _commit, tmp, save, finalize)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _on_rank_0(rank: int, fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args) if rank == 0 else None


def _make_tmp(save: Path, overwrite: bool, inputs: Mapping[str, str | Path | None]) -> Path:
    check_output_dir(save, overwrite, inputs=inputs)
    tmp = save.parent / temp_name(save.name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _commit(tmp: Path, save: Path, finalize: Callable[[Path], None]) -> None:
    """Rank 0, once every rank file is written: meta, plan and tracker into the temp dir, then swap it into place."""
    finalize(tmp)
    swap_into_place(tmp, save)


class PageDropper:
    """release(tensor) for apply_rank: once a source tensor mmap'd from `path` has been read, drop its resident
    pages (madvise MADV_DONTNEED), so a rank's peak memory is its output plus one input tensor, not the whole
    input shard. Only ranges inside a file-backed private mapping of `path` are touched: there the kernel
    re-reads the file if the pages are used again, so data never changes. A no-op where /proc is unavailable."""

    MADV_DONTNEED = 4

    def __init__(self, path: Path):
        self.ranges: list[tuple[int, int]] = []
        real = os.path.realpath(path)
        try:
            with open("/proc/self/maps") as f:
                for line in f:
                    parts = line.split(maxsplit=5)
                    if len(parts) == 6 and parts[5].strip() == real:
                        lo, hi = (int(x, 16) for x in parts[0].split("-"))
                        self.ranges.append((lo, hi))
            self._madvise = ctypes.CDLL(None, use_errno=True).madvise
        except (OSError, AttributeError):
            self.ranges = []

    def __call__(self, t: torch.Tensor | None) -> None:
        if t is None or not self.ranges or t.device.type != "cpu":
            return
        storage = t.untyped_storage()
        lo, hi = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        if not any(a <= lo and hi <= b for a, b in self.ranges):
            return
        page = mmap.PAGESIZE
        start, end = -(-lo // page) * page, hi // page * page
        if end > start:
            self._madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), self.MADV_DONTNEED)
