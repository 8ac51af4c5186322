""".zst input read to its end, or refused in one line naming the file.

zstandard's stream reader ends quietly where a truncated file ends (a cut download kept 153 of 521 documents,
exit 0). `open_zstd` first walks the file's frame and block headers (seeking over the compressed bytes: no
decompression, bounded memory) and refuses a file that is not zstd or that ends inside a frame; it then
decompresses every frame (pzstd and concatenated files hold several), turning zstandard's errors (corrupt data,
bad checksum) into the same one-line error.
"""

from __future__ import annotations

import io
import struct
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import IO, Iterator

from megatron_prune.errors import InputError

ZSTD_MAGIC = 0xFD2FB528
_SKIPPABLE = 0x184D2A50  # ..5F: skippable frames (metadata), 4-byte magic + 4-byte size + content
_BLOCK_RAW, _BLOCK_RLE, _BLOCK_RESERVED = 0, 1, 3


class CompressedInputError(InputError):
    """A compressed input that cannot be read to its end: not zstd, truncated, or corrupt."""


def check_zstd_complete(path: Path, zstandard: ModuleType) -> None:
    """Every frame of `path` is whole: its header, all its blocks (up to the last-block flag), its checksum."""
    size = path.stat().st_size
    if size == 0:
        raise CompressedInputError(f"{path}: empty file (not zstd-compressed)")
    with open(path, "rb") as f:
        frames = 0
        while f.tell() < size:
            start = f.tell()
            head = f.read(18)  # the longest frame header
            magic = struct.unpack("<I", head[:4])[0] if len(head) >= 4 else None
            if magic is not None and magic & 0xFFFFFFF0 == _SKIPPABLE and len(head) >= 8:
                f.seek(start + 8 + struct.unpack("<I", head[4:8])[0])
            elif magic == ZSTD_MAGIC:
                f.seek(start + _frame_header(path, head, zstandard, start, size))
                _skip_blocks(path, f, size, _has_checksum(head, zstandard))
            else:
                what = "is not zstd-compressed" if frames == 0 else "holds bytes after its last zstd frame"
                raise CompressedInputError(f"{path}: {what} (no zstd frame at byte {start})")
            frames += 1
        if f.tell() > size:
            raise _truncated(path, size)


def _frame_header(path: Path, head: bytes, zstandard: ModuleType, start: int, size: int) -> int:
    try:
        n = zstandard.frame_header_size(head)
    except zstandard.ZstdError:
        if start + len(head) >= size:  # the file ends within the header
            raise _truncated(path, size) from None
        raise CompressedInputError(f"{path}: corrupt zstd frame header at byte {start}") from None
    if start + n > size:
        raise _truncated(path, size)
    return n


def _has_checksum(head: bytes, zstandard: ModuleType) -> bool:
    return bool(zstandard.get_frame_parameters(head).has_checksum)


def _skip_blocks(path: Path, f: IO[bytes], size: int, checksum: bool) -> None:
    while True:
        raw = f.read(3)
        if len(raw) < 3:
            raise _truncated(path, size)
        header = int.from_bytes(raw, "little")
        last, kind, length = header & 1, (header >> 1) & 3, header >> 3
        if kind == _BLOCK_RESERVED:
            raise CompressedInputError(f"{path}: corrupt zstd data (reserved block type at byte {f.tell() - 3})")
        f.seek(1 if kind == _BLOCK_RLE else length, io.SEEK_CUR)
        if f.tell() > size:
            raise _truncated(path, size)
        if last:
            break
    if checksum:
        f.seek(4, io.SEEK_CUR)
        if f.tell() > size:
            raise _truncated(path, size)


def _truncated(path: Path, size: int) -> CompressedInputError:
    return CompressedInputError(f"{path}: truncated zstd file (it ends inside a frame, after {size} bytes; an "
                                f"interrupted download or copy?): re-fetch or recompress it")


class _Decompressed(io.RawIOBase):
    """zstandard's multi-frame stream reader with its errors as one-line CompressedInputErrors."""

    def __init__(self, path: Path, stream, zstandard: ModuleType):
        self._path, self._stream, self._error = path, stream, zstandard.ZstdError

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            return self._stream.readinto(buffer)
        except self._error as e:
            raise CompressedInputError(f"{self._path}: corrupt zstd data ({e})") from None


@contextmanager
def open_zstd(path: Path, zstandard: ModuleType) -> Iterator[IO[bytes]]:
    """The decompressed bytes of every frame of `path`, after check_zstd_complete."""
    check_zstd_complete(path, zstandard)
    # The Pile's shards were written with long windows; allow them.
    dctx = zstandard.ZstdDecompressor(max_window_size=2**31)
    with open(path, "rb") as raw, dctx.stream_reader(raw, read_across_frames=True) as stream:
        yield io.BufferedReader(_Decompressed(path, stream, zstandard), buffer_size=1 << 16)
