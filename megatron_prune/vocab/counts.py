"""Token frequencies of a corpus (multiprocess), the counts file, and choosing the ids to keep.

counts.json records the tokenizer's fingerprint (vocabulary size and sha256 of its token strings), so counts made
with another tokenizer are refused instead of silently pruning the wrong ids. Documents are read and tokenized
exactly as `preprocess` does (same readers, same `encode`, no BOS/EOS).
"""

from __future__ import annotations

import json
import multiprocessing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from megatron_prune.errors import UserError
from megatron_prune.checkpoint.atomic import atomic_write_text

COUNTS_FORMAT = "megatron_prune.vocab_counts/1"
BATCH_BYTES = 1 << 20  # documents are sent to workers in ~1 MB batches


class CountsError(UserError, ValueError):
    """A counts file that is invalid or does not belong to the tokenizer; the message says which."""


@dataclass(frozen=True)
class TokenCounts:
    counts: tuple[int, ...]       # one entry per token id
    tokenizer: dict[str, Any]     # TokenizerSource.fingerprint()
    inputs: tuple[str, ...] = ()
    documents: int = 0

    def __post_init__(self) -> None:
        if len(self.counts) != self.tokenizer.get("vocab_size"):
            raise CountsError(f"{len(self.counts)} counts for a tokenizer of {self.tokenizer.get('vocab_size')} ids")
        if any(c < 0 for c in self.counts):
            raise CountsError("negative token counts")

    @property
    def total(self) -> int:
        return sum(self.counts)

    def to_json(self) -> dict[str, Any]:
        return {"format": COUNTS_FORMAT, "tokenizer": self.tokenizer, "inputs": list(self.inputs),
                "documents": self.documents, "tokens": self.total, "counts": list(self.counts)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TokenCounts":
        if not isinstance(d, dict) or d.get("format") != COUNTS_FORMAT:
            raise CountsError(f"not a counts file (format {d.get('format') if isinstance(d, dict) else None!r}, "
                              f"expected {COUNTS_FORMAT!r}; make one with `vocab-freq`)")
        counts, tokenizer = d.get("counts"), d.get("tokenizer")
        if not isinstance(counts, list) or not all(_is_count(c) for c in counts):
            bad = next((c for c in counts if not _is_count(c)), None) if isinstance(counts, list) else counts
            raise CountsError(f"'counts' must be a list of non-negative integers (found {bad!r})")
        if not (isinstance(tokenizer, dict) and _is_count(tokenizer.get("vocab_size"))
                and isinstance(tokenizer.get("vocab_sha256"), str)):
            raise CountsError("'tokenizer' must record the tokenizer's vocab_size and vocab_sha256 (as vocab-freq "
                              "writes it)")
        inputs, documents = d.get("inputs", []), d.get("documents", 0)
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs) or not _is_count(documents):
            raise CountsError("'inputs' must be a list of paths and 'documents' a non-negative integer")
        return cls(tuple(counts), dict(tokenizer), tuple(inputs), documents)


def _is_count(value: Any) -> bool:
    """A JSON integer >= 0 (not a bool, not a float such as 1.5 or 1e400)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def write_counts(path: str | Path, counts: TokenCounts) -> None:
    atomic_write_text(path, json.dumps(counts.to_json()) + "\n")


def read_counts(path: str | Path) -> TokenCounts:
    path = Path(path)
    if not path.is_file():
        raise CountsError(f"{path}: no such counts file")
    try:
        return TokenCounts.from_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CountsError(f"{path}: invalid counts file ({type(e).__name__}: {e})") from None
    except CountsError as e:
        raise CountsError(f"{path}: {e}") from None


def check_counts_match(counts: TokenCounts, fingerprint: dict[str, Any], counts_name: str = "counts") -> None:
    """Raise CountsError unless the counts were made with a tokenizer of the same vocabulary."""
    have, want = counts.tokenizer, fingerprint
    if (have.get("vocab_size"), have.get("vocab_sha256")) != (want["vocab_size"], want["vocab_sha256"]):
        raise CountsError(
            f"{counts_name} were made with another tokenizer ({have.get('path')}: {have.get('vocab_size')} ids, "
            f"vocab sha256 {str(have.get('vocab_sha256'))[:12]}) than {want['path']} ({want['vocab_size']} ids, "
            f"vocab sha256 {want['vocab_sha256'][:12]}); recount with `vocab-freq --tokenizer {want['path']}`")


def top_ids(counts: Sequence[int], keep: int, exclude: Iterable[int]) -> list[int]:
    """The `keep` most frequent ids outside `exclude` (ties: lower id first, i.e. SentencePiece's score order)."""
    excluded = set(exclude)
    candidates = [i for i in range(len(counts)) if i not in excluded]
    if not 1 <= keep <= len(candidates):
        raise CountsError(f"--keep-min {keep} must be between 1 and the {len(candidates)} prunable tokens of the "
                          f"vocabulary ({len(counts)} ids, of which {len(excluded)} are always kept: special, "
                          "byte-fallback and config-named tokens)")
    candidates.sort(key=lambda i: (-counts[i], i))
    return candidates[:keep]


# ---------------------------------------------------------------------------- counting
_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer: str, json_key: str) -> None:
    from megatron_prune.data.preprocess import Encoder
    from megatron_prune.data.tokenizers import load_tokenizer

    try:
        _WORKER["encoder"] = Encoder(load_tokenizer(tokenizer), json_key, append_eod=False, splitter=None)
    except Exception as e:  # a Pool initializer that raises is respawned forever: let the first task raise it
        _WORKER["error"] = e


def _count_batch(docs: list) -> tuple[np.ndarray, np.ndarray, int]:
    """(unique ids, their counts, documents) of one batch: compact to send back even for 128k vocabularies."""
    if "error" in _WORKER:
        raise _WORKER["error"]
    encoder = _WORKER["encoder"]
    ids = [encoder.encode(doc).ids for doc in docs]
    flat = np.concatenate(ids) if ids else np.zeros(0, np.int32)
    uniq, cnt = np.unique(flat, return_counts=True)
    return uniq, cnt, len(docs)


def _batches(docs: Iterable, max_bytes: int) -> Iterator[list]:
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc.payload)
        if size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def count_tokens(tokenizer: str | Path, inputs: Sequence[str], json_key: str = "text", workers: int = 1,
                 progress: bool = True, batch_bytes: int = BATCH_BYTES) -> TokenCounts:
    """Token counts of every document of `inputs` (.jsonl/.json/.txt, optionally .zst; globs allowed)."""
    from megatron_prune.data.preprocess import expand_inputs, iter_documents
    from megatron_prune.vocab.tokenizer_files import TokenizerSource

    from megatron_prune.data.tokenizers import load_tokenizer

    fingerprint = TokenizerSource.read(tokenizer).fingerprint()
    loaded = load_tokenizer(tokenizer).vocab_size  # what preprocessing will use: it must agree with the files
    if loaded != fingerprint["vocab_size"]:
        raise CountsError(f"{tokenizer}: loads with {loaded} ids but its files list {fingerprint['vocab_size']}")
    files = expand_inputs(inputs)
    total = np.zeros(fingerprint["vocab_size"], dtype=np.int64)
    documents = 0
    batches = _batches(iter_documents(files), batch_bytes)
    with tqdm(desc="count", unit="doc", disable=not progress) as bar:
        for uniq, cnt, n in _run_batches(str(tokenizer), json_key, workers, batches):
            if uniq.size and (uniq[0] < 0 or uniq[-1] >= total.size):
                raise CountsError(f"{tokenizer}: produced id {int(uniq[-1])}, outside its {total.size}-id vocabulary")
            np.add.at(total, uniq, cnt)
            documents += n
            bar.update(n)
    return TokenCounts(tuple(int(c) for c in total), fingerprint, tuple(str(f) for f in files), documents)


def _run_batches(tokenizer: str, json_key: str, workers: int, batches: Iterator[list]) -> Iterator[tuple]:
    if workers <= 1:
        _init_worker(tokenizer, json_key)
        yield from map(_count_batch, batches)
        return
    # forkserver: workers must not inherit the threads of a parent that imported torch / tokenizers.
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers, _init_worker, (tokenizer, json_key)) as pool:
        yield from pool.imap(_count_batch, batches)
