"""Text corpora -> megatron-core indexed dataset (``PREFIX_{key}_{document|sentence}.bin/.idx``).

Follows Megatron-LM's ``tools/preprocess_data.py``: each document is tokenized (optionally
sentence by sentence with NLTK punkt, one sequence per sentence), EOD is appended to the last
sequence of a document when asked, and documents are written with
``IndexedDatasetBuilder.add_document`` in input order, token dtype from ``DType.optimal_dtype``.

Inputs, chosen by file name (``.zst`` may wrap any of them; it needs ``pip install zstandard``):

* ``.jsonl`` / ``.json``: one JSON object per line (blank lines ignored); the document is
  ``obj[json_key]``, a string, or a list of strings taken as already-split sentences.
  ``.jsonl.zst`` is the Pile's format.
* ``.txt``: every blank-line-separated paragraph is one document (its line breaks are kept).

Documents that tokenize to nothing are skipped and counted. Outputs are written to temporary
sibling files and renamed at the end, so a failed run leaves no ``.bin``/``.idx`` behind.
"""

from __future__ import annotations

import functools
import glob
import io
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import IO, TYPE_CHECKING, Any, NamedTuple

import numpy as np

from megatron_prune.checkpoint.atomic import (check_no_overlap, fsync_path, remove_stale_temps, temp_name,
                                              translate_write_errors)
from megatron_prune.checkpoint.lock import output_lock
from megatron_prune.errors import UserError
from megatron_prune.data.compressed import open_zstd
from megatron_prune.data.tokenizers import Tokenizer, TokenizerError, load_tokenizer

if TYPE_CHECKING:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

JSON_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt",)
LLAMA_INDEX_NLTK_CACHE = ("_static", "nltk_cache")  # inside the llama_index.core package


class PreprocessError(UserError, ValueError):
    """A user error (bad input, bad key, bad tokenizer ...); the message is one line."""


@dataclass(frozen=True)
class PreprocessConfig:
    inputs: Sequence[str]  # files or glob patterns
    tokenizer: str  # SentencePiece .model file or HF tokenizer directory
    output_prefix: str  # Megatron appends _{json_key}_{document|sentence}
    json_key: str = "text"
    append_eod: bool = False
    workers: int = 1
    split_sentences: bool = False
    overwrite: bool = False
    progress: bool = True
    language: str = "english"  # punkt model used with split_sentences
    chunk_size: int = 64  # documents per worker task (fewer, larger messages between processes)


@dataclass(frozen=True)
class PreprocessStats:
    prefix: str  # the dataset prefix as megatron-core's IndexedDataset takes it
    documents: int
    sequences: int
    tokens: int
    skipped_empty: int  # documents that produced no tokens
    input_bytes: int  # UTF-8 bytes read: JSON lines, or paragraph text
    dtype: str
    seconds: float  # encoding and writing, worker start-up included

    @property
    def docs_per_s(self) -> float:
        return self.documents / max(self.seconds, 1e-9)

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / 1e6 / max(self.seconds, 1e-9)


class RawDoc(NamedTuple):
    source: str  # file name, for error messages
    line: int  # 1-based line where the document starts
    payload: str  # a JSON line, or the document text
    is_json: bool


class EncodedDoc(NamedTuple):
    ids: np.ndarray  # int32, all sequences of the document concatenated
    lengths: list[int]  # one entry per sequence (sentence); sums to len(ids)
    nbytes: int


# ---------------------------------------------------------------- inputs


def output_prefix(prefix: str, json_key: str = "text", split_sentences: bool = False) -> str:
    """Megatron-LM's naming: ``{prefix}_{key}_{document|sentence}``."""
    return f"{prefix}_{json_key}_{'sentence' if split_sentences else 'document'}"


def expand_inputs(patterns: Iterable[str]) -> list[Path]:
    """Files named by ``patterns`` (globs allowed), in the given order, each glob sorted."""
    files: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise PreprocessError(f"no input files match {pattern!r}")
            files += [Path(m) for m in matches]
        elif not os.path.isfile(pattern):
            raise PreprocessError(f"{pattern}: no such input file")
        else:
            files.append(Path(pattern))
    if not files:
        raise PreprocessError("no input files given")
    for f in files:
        input_kind(f)  # reject unsupported names before any work
    return files


def input_kind(path: Path) -> tuple[str, bool]:
    """(``"json"`` or ``"text"``, compressed) from the file name."""
    name = path.name.lower()
    compressed = name.endswith(".zst")
    if compressed:
        name = name[: -len(".zst")]
    if name.endswith(JSON_SUFFIXES):
        return "json", compressed
    if name.endswith(TEXT_SUFFIXES):
        return "text", compressed
    raise PreprocessError(f"{path}: unsupported input type (expected .jsonl, .json, .txt, optionally .zst-compressed)")


def require_zstandard(path: Path) -> ModuleType:
    """The zstandard module, or a clear error: it is an optional dependency."""
    try:
        import zstandard
    except ImportError:
        raise PreprocessError(f"{path}: reading .zst input needs the zstandard package "
                              "(pip install zstandard, or pip install 'megatron_prune[zst]')") from None
    return zstandard


@contextmanager
def open_text(path: Path) -> Iterator[IO[str]]:
    """The file as UTF-8 text, decompressing .zst on the fly (every frame, to the end; a BOM is dropped)."""
    if not input_kind(path)[1]:
        with open(path, encoding="utf-8-sig", newline=None) as fh:
            yield fh
        return
    with open_zstd(path, require_zstandard(path)) as stream:  # read to its end, or one line naming the file
        yield io.TextIOWrapper(stream, encoding="utf-8-sig")


def _json_docs(path: Path, fh: IO[str]) -> Iterator[RawDoc]:
    for lineno, line in enumerate(fh, start=1):
        if line.strip():
            yield RawDoc(str(path), lineno, line, True)


def _text_docs(path: Path, fh: IO[str]) -> Iterator[RawDoc]:
    para: list[str] = []
    start = 0
    for lineno, line in enumerate(fh, start=1):
        if line.strip():
            if not para:
                start = lineno
            para.append(line.rstrip("\n"))
        elif para:
            yield RawDoc(str(path), start, "\n".join(para), False)
            para = []
    if para:
        yield RawDoc(str(path), start, "\n".join(para), False)


def iter_documents(files: Iterable[Path]) -> Iterator[RawDoc]:
    """Raw documents of all files in order; an input file without any document is an error."""
    for path in files:
        count = 0
        kind, _ = input_kind(path)
        try:
            with open_text(path) as fh:
                for doc in (_json_docs if kind == "json" else _text_docs)(path, fh):
                    count += 1
                    yield doc
        except UnicodeDecodeError as exc:
            raise PreprocessError(f"{path}: not UTF-8 text ({exc.reason} near byte {exc.start} "
                                  f"of a read block)") from None
        except OSError as exc:
            raise PreprocessError(f"{path}: cannot read ({exc.strerror or exc})") from None
        if count == 0:
            raise PreprocessError(f"{path}: no documents (empty input file)")


# ---------------------------------------------------------------- sentence splitting


def _punkt_candidate_roots() -> list[str]:
    """NLTK_DATA (read now, not at nltk import), nltk's standard places, llama-index's copy."""
    import importlib.util

    import nltk

    roots = [p for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]
    roots += [str(p) for p in nltk.data.path]
    try:
        spec = importlib.util.find_spec("llama_index.core")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        roots += [os.path.join(loc, *LLAMA_INDEX_NLTK_CACHE) for loc in spec.submodule_search_locations]
    return list(dict.fromkeys(roots))


def find_punkt(language: str = "english") -> str:
    """The NLTK data root that holds ``tokenizers/punkt_tab/{language}``; raises if none does."""
    import nltk

    roots = _punkt_candidate_roots()
    for root in roots:
        try:
            nltk.data.find(f"tokenizers/punkt_tab/{language}/", paths=[root])
            return root
        except LookupError:
            continue
    raise PreprocessError(
        f"--split-sentences needs NLTK's punkt_tab data ({language}), found in none of: {', '.join(roots)}. "
        "Offline: pip install llama-index-core (it ships llama_index/core/_static/nltk_cache) and set "
        "NLTK_DATA to that folder; or on a connected machine run "
        "`python -m nltk.downloader -d DIR punkt_tab`, copy DIR here and set NLTK_DATA=DIR")


def sentence_splitter(punkt_root: str, language: str = "english") -> Callable[[str], list[str]]:
    """punkt's ``tokenize`` with the parameters from ``punkt_root``: what ``nltk.sent_tokenize``
    does. ``punkt_root`` is added to this process's ``nltk.data.path`` when missing: recent nltk
    refuses to open data outside it (and a worker may not see the caller's NLTK_DATA)."""
    import nltk
    from nltk.tokenize.punkt import PunktSentenceTokenizer, load_punkt_params

    if punkt_root not in nltk.data.path:
        nltk.data.path.append(punkt_root)
    lang_dir = nltk.data.find(f"tokenizers/punkt_tab/{language}/", paths=[punkt_root])
    return PunktSentenceTokenizer(load_punkt_params(lang_dir)).tokenize


# ---------------------------------------------------------------- encoding


class Encoder:
    """Turns a :class:`RawDoc` into token ids, as Megatron-LM's ``Encoder.encode`` does."""

    def __init__(self, tokenizer: Tokenizer, json_key: str, append_eod: bool,
                 splitter: Callable[[str], list[str]] | None) -> None:
        self.tokenizer = tokenizer
        self.json_key = json_key
        self.eod = tokenizer.eod if append_eod else None
        self.splitter = splitter

    def sentences(self, doc: RawDoc) -> list[str]:
        text = self._text(doc)
        if isinstance(text, list):
            return text  # already split by whoever wrote the file
        return self.splitter(text) if self.splitter is not None else [text]

    def _text(self, doc: RawDoc) -> str | list[str]:
        if not doc.is_json:
            return doc.payload
        where = f"{doc.source}:{doc.line}"
        try:
            obj = json.loads(doc.payload)
        except json.JSONDecodeError as exc:
            raise PreprocessError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise PreprocessError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        if self.json_key not in obj:
            keys = ", ".join(repr(k) for k in list(obj)[:10])
            raise PreprocessError(f"{where}: missing JSON key {self.json_key!r} (keys present: {keys or 'none'})")
        text = obj[self.json_key]
        if isinstance(text, str) or (isinstance(text, list) and all(isinstance(t, str) for t in text)):
            return text
        raise PreprocessError(f"{where}: key {self.json_key!r} holds {type(text).__name__}, "
                              "expected a string or a list of strings")

    def encode(self, doc: RawDoc) -> EncodedDoc:
        ids: list[int] = []
        lengths: list[int] = []
        for sentence in self.sentences(doc):
            sentence_ids = self.tokenizer.encode(sentence)
            if sentence_ids:  # Megatron-LM drops sentences that tokenize to nothing
                ids += sentence_ids
                lengths.append(len(sentence_ids))
        if ids and self.eod is not None:
            ids.append(self.eod)
            lengths[-1] += 1
        return EncodedDoc(np.asarray(ids, dtype=np.int32), lengths, len(doc.payload.encode("utf-8")))


class WorkerSettings(NamedTuple):
    tokenizer: str
    json_key: str
    append_eod: bool
    punkt_root: str | None
    language: str


@functools.lru_cache(maxsize=2)
def _worker_encoder(settings: WorkerSettings) -> Encoder:
    """One Encoder per worker process (memoised: loading a tokenizer costs up to seconds)."""
    splitter = sentence_splitter(settings.punkt_root, settings.language) if settings.punkt_root else None
    return Encoder(load_tokenizer(settings.tokenizer), settings.json_key, settings.append_eod, splitter)


def _init_worker(settings: WorkerSettings) -> None:
    try:
        _worker_encoder(settings)
    except Exception:
        pass  # a Pool initializer that raises makes the pool respawn workers forever; let tasks raise


def _encode_in_worker(settings: WorkerSettings, doc: RawDoc) -> EncodedDoc:
    return _worker_encoder(settings).encode(doc)


# ---------------------------------------------------------------- output


@contextmanager
def atomic_outputs(prefix: str, overwrite: bool) -> Iterator[tuple[str, str]]:
    """Temporary sibling paths for ``prefix``.bin/.idx, renamed into place on success and
    removed (with an output folder this call created) on any failure; the prefix's lock is held throughout."""
    final = (prefix + ".bin", prefix + ".idx")
    parent = os.path.dirname(os.path.abspath(prefix))
    created = not os.path.isdir(parent)
    try:
        # One writer per prefix, as for every other output: a second run into it is refused at once (two runs
        # could otherwise each pass the existence check and publish a .bin and an .idx of different corpora).
        with output_lock(prefix):
            for path in final:
                remove_stale_temps(path)
            if not overwrite:
                for path in final:
                    if os.path.exists(path):
                        raise PreprocessError(f"output {path} exists (pass --overwrite to replace it)")
            with _published(final, parent) as temps:
                yield temps
    except BaseException:
        if created and os.path.isdir(parent) and not os.listdir(parent):
            os.rmdir(parent)
        raise


@contextmanager
def _published(final: tuple[str, str], parent: str) -> Iterator[tuple[str, str]]:
    # Plain names (not mkstemp, whose files are mode 0600) so outputs get the usual permissions.
    temps = tuple(str(Path(path).with_name(temp_name(Path(path).name))) for path in final)
    try:
        with translate_write_errors(final[0]):
            yield temps
            for tmp, path in ((temps[1], final[1]), (temps[0], final[0])):  # .bin last: it marks completion
                fsync_path(tmp)
                os.replace(tmp, path)
            fsync_path(parent)
    except BaseException:
        for path in temps:
            if os.path.exists(path):
                os.unlink(path)
        raise


def _progress(enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(unit="doc", unit_scale=True, desc="preprocess", disable=not enabled, mininterval=0.5)


def _add_document(builder: IndexedDatasetBuilder, doc: EncodedDoc, counts: dict[str, int]) -> None:
    counts["input_bytes"] += doc.nbytes
    if not doc.lengths:
        counts["skipped_empty"] += 1
        return
    builder.add_document(doc.ids, doc.lengths)
    counts["documents"] += 1
    counts["sequences"] += len(doc.lengths)
    counts["tokens"] += int(doc.ids.size)


def write_dataset(encoded: Iterable[EncodedDoc], bin_path: str, idx_path: str, vocab_size: int,
                  progress: bool = False) -> dict[str, int | str]:
    """Write documents with megatron-core's IndexedDatasetBuilder; returns counts."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    dtype = DType.optimal_dtype(vocab_size)
    builder = IndexedDatasetBuilder(bin_path, dtype=dtype)
    counts = dict(documents=0, sequences=0, tokens=0, skipped_empty=0, input_bytes=0)
    start = last = time.perf_counter()
    try:
        with _progress(progress) as bar:
            for doc in encoded:
                _add_document(builder, doc, counts)
                bar.update(1)
                now = time.perf_counter()
                if now - last > 0.5:  # tqdm shows docs/s itself; add the byte rate
                    last = now
                    bar.set_postfix_str(f"{counts['input_bytes'] / 1e6 / (now - start):.2f} MB/s", refresh=False)
            bar.set_postfix_str(f"{counts['input_bytes'] / 1e6 / (time.perf_counter() - start):.2f} MB/s")
        builder.finalize(idx_path)
    finally:
        builder.data_file.close()  # finalize closes it too; this covers the failure path
    return {**counts, "dtype": np.dtype(dtype).name}


# ---------------------------------------------------------------- pipeline


def _validate(cfg: PreprocessConfig) -> tuple[list[Path], Tokenizer, str | None]:
    """Everything that can be checked before writing anything."""
    if not cfg.json_key:
        raise PreprocessError("--json-key must not be empty")
    if cfg.workers < 1:
        raise PreprocessError(f"--workers must be at least 1, got {cfg.workers}")
    files = expand_inputs(cfg.inputs)
    for f in files:
        if input_kind(f)[1]:
            require_zstandard(f)
    try:
        tokenizer = load_tokenizer(cfg.tokenizer)
        if cfg.append_eod:
            _ = tokenizer.eod  # raises when the tokenizer defines no EOS
    except TokenizerError as exc:
        raise PreprocessError(str(exc)) from None
    punkt_root = find_punkt(cfg.language) if cfg.split_sentences else None
    return files, tokenizer, punkt_root


def _encoded_docs(cfg: PreprocessConfig, files: list[Path], tokenizer: Tokenizer,
                  punkt_root: str | None, stack: ExitStack) -> Iterator[EncodedDoc]:
    docs = iter_documents(files)
    if cfg.workers == 1:
        splitter = sentence_splitter(punkt_root, cfg.language) if punkt_root else None
        return map(Encoder(tokenizer, cfg.json_key, cfg.append_eod, splitter).encode, docs)
    settings = WorkerSettings(cfg.tokenizer, cfg.json_key, cfg.append_eod, punkt_root, cfg.language)
    # forkserver: workers must not inherit the threads of a parent that imported torch/tqdm.
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in multiprocessing.get_all_start_methods()
                                      else "spawn")
    pool = stack.enter_context(ctx.Pool(cfg.workers, initializer=_init_worker, initargs=(settings,)))
    return pool.imap(functools.partial(_encode_in_worker, settings), docs, chunksize=cfg.chunk_size)


def preprocess(cfg: PreprocessConfig) -> PreprocessStats:
    """Run the whole pipeline; raises :class:`PreprocessError` for user errors."""
    files, tokenizer, punkt_root = _validate(cfg)
    prefix = output_prefix(cfg.output_prefix, cfg.json_key, cfg.split_sentences)
    for path in (prefix + ".bin", prefix + ".idx"):
        check_no_overlap(path, [*files, cfg.tokenizer], what="output")
    import megatron.core.datasets.indexed_dataset  # noqa: F401 - slow import, kept out of the timing

    with atomic_outputs(prefix, cfg.overwrite) as (bin_tmp, idx_tmp), ExitStack() as stack:
        start = time.perf_counter()
        encoded = _encoded_docs(cfg, files, tokenizer, punkt_root, stack)
        counts = write_dataset(encoded, bin_tmp, idx_tmp, tokenizer.vocab_size, cfg.progress)
        seconds = time.perf_counter() - start
        if counts["documents"] == 0:
            raise PreprocessError(f"no tokens: all {counts['skipped_empty']} documents of the input are empty")
    return PreprocessStats(prefix=prefix, seconds=seconds, **counts)
