"""Calibration data of the pruner: token windows read the same way on every rank, and their fingerprint (recorded
in the plan, so a plan says which tokens scored it).

    calib = read_calibration(CalibConfig(data="corpus.jsonl"), tokenizer=load_dir, vocab=shape.vocab_size,
                             count=64)
    calib.windows       # [n <= count, seq_length + 1]
    calib.fingerprint() # {"source", "kind", "samples", "seq_length", "tokens", "sha256"}

The data is a text / jsonl file (tokenized with --tokenizer, default the checkpoint's own) or an indexed dataset
prefix (PREFIX.bin + PREFIX.idx, already tokenized); default: the shipped English sample. Text that cannot give
one window (empty, too short, binary) is a one-line InputError naming the file (data.text).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_prune.data.text import SAMPLES, read_windows, token_windows
from megatron_prune.errors import InputError

SAMPLE_TEXT = SAMPLES / "train.jsonl"


@dataclass(frozen=True)
class CalibConfig:
    data: str | None = None        # text / jsonl file, or an indexed dataset prefix; None: the shipped sample
    samples: int = 64
    seq_length: int = 256
    micro_batch_size: int = 4
    tokenizer: str | None = None   # for text; default: the checkpoint's own tokenizer files

    def __post_init__(self) -> None:
        for name in ("samples", "seq_length", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"calibration {name} must be >= 1, got {getattr(self, name)}")

    def source(self) -> tuple[str, Path]:
        """('indexed', prefix) or ('text', file); raises InputError when --calib-data is neither."""
        data = self.data or str(SAMPLE_TEXT)
        prefix = data[:-4] if data.endswith((".bin", ".idx")) else data
        if Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file():
            return "indexed", Path(prefix)
        if Path(data).is_file():
            return "text", Path(data)
        raise InputError(f"--calib-data {data}: neither a text/jsonl file nor an indexed dataset prefix "
                         f"(PREFIX.bin + PREFIX.idx)")


@dataclass(frozen=True)
class Calibration:
    """Token windows [n, seq_length + 1], identical on every rank, and where they came from."""
    windows: torch.Tensor
    where: dict            # {"source": path, "kind": "text" | "indexed"}
    seconds: float = 0.0   # reading and tokenizing them (read in the check, counted in the run's timings)

    def fingerprint(self) -> dict:
        return windows_fingerprint(self.windows, self.where)


def read_calibration(c: CalibConfig, tokenizer: str | Path, vocab: int, count: int) -> Calibration:
    """Up to `count` windows of `c.seq_length` + 1 tokens (`tokenizer`: for text data when c.tokenizer is None)."""
    t0 = time.perf_counter()
    kind, path = c.source()
    want = count * c.seq_length
    if kind == "indexed":
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        ds, ids = IndexedDataset(str(path)), []
        for i in range(len(ds)):
            ids += ds[i].tolist()
            if len(ids) > want:
                break
        windows = token_windows(ids, c.seq_length, want, source=str(path))
    else:
        windows = read_windows(path, c.tokenizer or tokenizer, c.seq_length, want)
    windows = windows[:count]
    if int(windows.max()) >= vocab:
        raise InputError(f"{path}: calibration token id {int(windows.max())} >= vocab size {vocab}: the "
                         f"tokenizer or dataset does not belong to this model")
    return Calibration(windows, {"source": str(path), "kind": kind}, time.perf_counter() - t0)


def windows_fingerprint(windows: torch.Tensor, where: dict) -> dict:
    digest = hashlib.sha256(windows.numpy().astype("int64").tobytes()).hexdigest()
    return {**where, "samples": len(windows), "seq_length": windows.shape[1] - 1,
            "tokens": int(windows[:, 1:].numel()), "sha256": digest}
