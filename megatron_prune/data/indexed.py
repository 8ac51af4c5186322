"""What megatron-core will read for training, checked before it reads it: the indexed dataset (PREFIX.bin/.idx) and
the files of a dataset index cache.

megatron-core trusts both. A truncated or foreign `.idx`/`.bin` fails only at the first batch, deep inside its
reader (a 40-line traceback); and it loads every index cache file with `numpy.load(allow_pickle=True)`, which
unpickles (so runs) anything that is not a plain `.npy` array. `check_indexed_dataset` reads the `.idx` layout
(Megatron-LM's `MMIDIDX` format, as `preprocess` writes it) and checks it against both files' sizes;
`check_index_cache` admits only plain numeric `.npy` arrays whose bytes are all there. Both read headers and
the index arrays only (memory-mapped, in bounded chunks), never the token data.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from megatron_prune.errors import InputError

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
_FIXED = len(INDEX_MAGIC) + 8 + 1 + 8 + 8  # magic, version <Q, dtype code <B, sequence count <Q, document count <Q
_CHUNK = 1 << 22  # index entries compared at a time (bounded memory for datasets of 10^8 sequences)


class DatasetFileError(InputError):
    """An indexed dataset or an index cache file that megatron-core must not be given; the message names it."""


# ---------------------------------------------------------------------------------------------- PREFIX.bin/.idx
def check_indexed_dataset(prefix: str | Path) -> tuple[int, int]:
    """Refuse a PREFIX.idx / PREFIX.bin pair that megatron-core could not read to its end. Returns (documents,
    tokens)."""
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    with open(idx, "rb") as f:
        head = f.read(_FIXED)
    if len(head) < _FIXED or head[:len(INDEX_MAGIC)] != INDEX_MAGIC:
        raise DatasetFileError(f"{idx}: not a Megatron indexed-dataset index (no {INDEX_MAGIC[:7].decode()} header; "
                               f"write it with `python -m megatron_prune preprocess`)")
    version, code, sequences, documents = struct.unpack("<QBQQ", head[len(INDEX_MAGIC):])
    if version != INDEX_VERSION:
        raise DatasetFileError(f"{idx}: index format version {version}, expected {INDEX_VERSION}")
    itemsize = _token_itemsize(idx, code)
    expected = _FIXED + 4 * sequences + 8 * sequences + 8 * documents
    size = idx.stat().st_size
    if size != expected:
        raise DatasetFileError(f"{idx}: {'truncated' if size < expected else 'unexpected size'} ({size} bytes; its "
                               f"header announces {sequences} sequences and {documents - 1} documents: {expected} "
                               f"bytes)")
    raw = np.memmap(idx, dtype=np.uint8, mode="r")
    lengths = raw[_FIXED:_FIXED + 4 * sequences].view(np.int32)
    pointers = raw[_FIXED + 4 * sequences:_FIXED + 12 * sequences].view(np.int64)
    doc_index = raw[_FIXED + 12 * sequences:expected].view(np.int64)
    _check_documents(idx, doc_index, sequences)
    tokens = _check_sequences(idx, lengths, pointers, itemsize)
    have = bin_.stat().st_size
    if have != tokens * itemsize:
        raise DatasetFileError(f"{bin_}: {have} bytes, but {idx} describes {tokens} tokens of {itemsize} bytes "
                               f"({tokens * itemsize} bytes): "
                               f"{'truncated' if have < tokens * itemsize else 'not its data'}")
    return documents - 1, tokens


def _token_itemsize(idx: Path, code: int) -> int:
    from megatron.core.datasets.indexed_dataset import DType

    try:
        return np.dtype(DType.dtype_from_code(code)).itemsize
    except ValueError:
        raise DatasetFileError(f"{idx}: unknown token dtype code {code} (corrupt index?)") from None


def _check_documents(idx: Path, doc_index: np.ndarray, sequences: int) -> None:
    if doc_index.size < 2 or doc_index[0] != 0 or doc_index[-1] != sequences:
        raise DatasetFileError(f"{idx}: corrupt document index (documents must cover sequences 0..{sequences}; "
                               f"an empty dataset holds no document)")
    for start in range(0, doc_index.size - 1, _CHUNK):
        part = doc_index[start:start + _CHUNK + 1]
        if (np.diff(part) < 0).any():
            raise DatasetFileError(f"{idx}: corrupt document index (not increasing near entry {start})")


def _check_sequences(idx: Path, lengths: np.ndarray, pointers: np.ndarray, itemsize: int) -> int:
    """Every sequence starts where the previous one ended; returns the total token count."""
    if lengths.size == 0:
        return 0
    if pointers[0] != 0:
        raise DatasetFileError(f"{idx}: corrupt sequence pointers (the first is {int(pointers[0])}, not 0)")
    for start in range(0, lengths.size, _CHUNK):
        n = lengths[start:start + _CHUNK].astype(np.int64)
        p = pointers[start:start + _CHUNK + 1]
        if (n < 0).any() or (np.diff(p) != n[:p.size - 1] * itemsize).any():
            raise DatasetFileError(f"{idx}: corrupt sequence lengths or pointers near sequence {start}")
    return int(pointers[-1]) // itemsize + int(lengths[-1])


# ---------------------------------------------------------------------------------------------- index cache
def check_index_cache(directory: str | Path) -> None:
    """Refuse a dataset index cache holding anything megatron-core's `numpy.load(allow_pickle=True)` would
    unpickle, or an array whose bytes are not all there (a run killed while writing it)."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for path in sorted(directory.iterdir()):
        if path.name.endswith(".npy"):
            check_npy_array(path)


def check_npy_array(path: Path) -> None:
    """A plain `.npy` file of a numeric dtype, complete: what `numpy.load` memory-maps without unpickling."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as f:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = fmt.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = fmt.read_array_header_2_0(f)
            else:
                raise ValueError(f"npy format version {version}")
            data_start = f.tell()
    except (ValueError, OSError, EOFError):
        raise DatasetFileError(f"{path}: not a plain .npy array, which is all a dataset index cache holds "
                               f"(megatron-core would unpickle it, running any code inside): remove it") from None
    if dtype.hasobject or dtype.kind not in "iu":
        raise DatasetFileError(f"{path}: a {dtype} array where a dataset index cache holds integers; remove it")
    need = data_start + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if path.stat().st_size < need:
        raise DatasetFileError(f"{path}: truncated index cache file ({path.stat().st_size} of {need} bytes; left by "
                               f"a run killed while writing it?): remove it")
