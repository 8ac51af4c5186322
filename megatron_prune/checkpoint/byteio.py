"""Byte-level I/O of rank files: where each tensor's bytes are (`read_refs`, from a meta-device load that reads no
data), reading them into memory, and copying byte ranges file to file (copy_file_range where the filesystems allow
it, as `cp` does). No checkpoint logic: the resharder and the torch_dist writer build on it."""

from __future__ import annotations

import contextlib
import errno
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_prune.checkpoint import megatron_io as mio
from megatron_prune.checkpoint.errors import CheckpointError
from megatron_prune.checkpoint.keys import to_local_names

CHUNK = 1 << 20  # bytes per read/write through memory: cache-sized buffers copy fastest


@dataclass(frozen=True)
class TensorRef:
    """Where one source tensor's bytes are: a contiguous run of its rank file."""

    path: Path
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _storage_offset(t: torch.Tensor) -> int | None:
    return getattr(t.untyped_storage(), "_checkpoint_offset", None)


def read_refs(path: Path) -> tuple[dict, dict[str, TensorRef]]:
    """(rank state without "model", {local key: TensorRef}) of one rank file, reading no tensor data."""
    state = mio.load_rank_file(path, map_location="meta", mmap=False)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{path}: not a Megatron rank file (no 'model' state dict)")
    size, refs = path.stat().st_size, {}
    for key, t in to_local_names(state.pop("model")).items():
        if not isinstance(t, torch.Tensor):
            continue
        base = _storage_offset(t)
        if base is None:
            raise CheckpointError(f"torch {torch.__version__} does not report tensor offsets of meta loads; "
                                  f"resharding needs a newer torch (developed with 2.13)")
        if not t.is_contiguous():
            raise CheckpointError(f"{path}: tensor {key!r} is not contiguous (stride {t.stride()})")
        ref = TensorRef(path, base + t.storage_offset() * t.element_size(), tuple(t.shape), t.dtype)
        if ref.offset + ref.nbytes > size:
            raise CheckpointError(f"{path}: truncated ({size} bytes; tensor {key!r} ends at byte "
                                  f"{ref.offset + ref.nbytes})")
        refs[key] = ref
    return state, refs


class RankFileIO:
    """Read-only descriptors of source rank files (opened on first use) and reusable scratch buffers (fresh
    allocations would cost a page fault per 4 KiB on every tensor); released on exit."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._buffers: dict[str, torch.Tensor] = {}

    def fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        if name not in self._buffers or self._buffers[name].numel() < nbytes:
            self._buffers[name] = torch.empty(0, dtype=torch.uint8)  # free the old one first
            self._buffers[name] = torch.empty(nbytes, dtype=torch.uint8)
        return self._buffers[name][:nbytes].view(dtype).view(shape)

    def __enter__(self) -> "RankFileIO":
        return self

    def __exit__(self, *exc) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._buffers.clear()


def as_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def pread_into(fd: int, buffers: list[memoryview], offset: int, path: Path) -> None:
    """Fill `buffers` (in order) from the contiguous file range at `offset`."""
    want = sum(map(len, buffers))
    if want and os.preadv(fd, buffers, offset) != want:  # regular files read short only when truncated
        raise CheckpointError(f"{path}: truncated (short read at byte {offset}, {want} bytes wanted)")


def read_tensor(ref: TensorRef, io: RankFileIO, scratch: str | None = None) -> torch.Tensor:
    """A source tensor in memory: a new tensor, or the reusable buffer `scratch` (valid until its next use)."""
    t = io.buffer(scratch, ref.shape, ref.dtype) if scratch else torch.empty(ref.shape, dtype=ref.dtype)
    data = as_bytes(t)
    for start in range(0, len(data), CHUNK):
        pread_into(io.fd(ref.path), [data[start:start + CHUNK]], ref.offset + start, ref.path)
    return t


def pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:done + CHUNK], offset + done)


_KERNEL_COPY = hasattr(os, "copy_file_range")


def copy_range(src_fd: int, dst_fd: int, n: int, src_off: int, dst_off: int, path: Path) -> None:
    """n bytes file to file: in the kernel (copy_file_range, like `cp`) where the filesystems allow it."""
    global _KERNEL_COPY
    while n > 0:
        k = 0
        if _KERNEL_COPY:
            try:
                k = os.copy_file_range(src_fd, dst_fd, min(n, 1 << 30), src_off, dst_off)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                _KERNEL_COPY = False
        if not _KERNEL_COPY:
            data = os.pread(src_fd, min(n, CHUNK), src_off)
            pwrite_all(dst_fd, data, dst_off)
            k = len(data)
        if k == 0:
            raise CheckpointError(f"{path}: truncated at byte {src_off}")
        n, src_off, dst_off = n - k, src_off + k, dst_off + k


def save_rank_skeleton(root: Path, tp_rank: int, pp_rank: int, pp: int,
                       specs: dict[str, tuple[tuple[int, ...], torch.dtype] | None],
                       args) -> tuple[Path, dict[str, TensorRef]]:
    """A release rank file whose tensors are holes: its zip records and pickle written (name -> (shape, dtype), or
    None for an `_extra_state` entry), each tensor's bytes left for the caller to fill in place at the returned
    refs' offsets (`fill_rank_file`). torch.empty never touches its pages, and skip_data never reads them: the
    skeleton costs no memory whatever the tensors' size."""
    model = {name: None if spec is None else torch.empty(spec[0], dtype=spec[1]) for name, spec in specs.items()}
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        path = mio.save_rank(root, "release", tp_rank, pp_rank, pp, mio.rank_state(model, args, 0))
    return path, read_refs(path)[1]


@contextlib.contextmanager
def fill_rank_file(path: Path):
    """The skeleton's file descriptor, for pwrite_all at its refs' offsets."""
    fd = os.open(path, os.O_WRONLY)
    try:
        yield fd
    finally:
        os.close(fd)
