"""Plain text for evaluation and calibration: a .txt file, or a .jsonl whose "text" fields are joined by blank
lines, tokenized into non-overlapping next-token windows.

    windows = read_windows("heldout.jsonl", tokenizer_dir, seq_length=512, max_tokens=None)   # [n, 513]

Text the tools cannot use (binary, empty, shorter than one window) is a one-line InputError naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

from megatron_prune.data.tokenizers import load_tokenizer
from megatron_prune.errors import InputError

SAMPLES = Path(__file__).resolve().parent / "samples"  # the shipped English sample texts (see its README.md)


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}): give a .txt or "
                         f".jsonl file (an indexed dataset is given by its PREFIX, with PREFIX.bin and PREFIX.idx)"
                         ) from None
    if "\x00" in text:
        raise InputError(f"{path}: not text: it holds NUL bytes (a binary file?)")
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as text-mode open reads them


def jsonl_texts(path: Path, text: str | None = None) -> Iterator[str]:
    """The "text" field of every non-blank line of a .jsonl file (`text`: its content, if already read)."""
    for n, line in enumerate((_decode(path) if text is None else text).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            doc = None
        if not isinstance(doc, str):
            raise InputError(f"{path}:{n}: not a JSON object with a 'text' field (a string)")
        yield doc


def read_text(path: Path) -> str:
    """The whole text of a .txt file, or a .jsonl file's "text" fields joined by blank lines."""
    path = Path(path)
    text = _decode(path)
    if path.suffix == ".jsonl":
        text = "\n\n".join(jsonl_texts(path, text))
    if not text.strip():
        raise InputError(f"{path}: holds no text")
    return text


def token_windows(ids: list[int], seq_length: int, max_tokens: int | None = None, source: str = "text"
                  ) -> torch.Tensor:
    """Non-overlapping [n, seq_length + 1] windows: each window's last token is the next one's first, so every
    token after the first is predicted exactly once. The trailing partial window is dropped."""
    if max_tokens is not None:
        ids = ids[: max_tokens + 1]
    n = (len(ids) - 1) // seq_length
    if n < 1:
        raise InputError(f"{source}: {len(ids)} tokens, fewer than one window of {seq_length + 1} "
                         f"(seq_length + 1)")
    t = torch.tensor(ids[: n * seq_length + 1], dtype=torch.long)
    return torch.stack([t[i * seq_length:(i + 1) * seq_length + 1] for i in range(n)])


def read_windows(text_file: str | Path, tokenizer_path: str | Path, seq_length: int, max_tokens: int | None
                 ) -> torch.Tensor:
    """Token windows of a text file (BOS first when the tokenizer has one), at most `max_tokens` predicted."""
    path = Path(text_file)
    if not path.is_file():
        raise InputError(f"{path}: no such text file")
    text = read_text(path)
    tok = load_tokenizer(tokenizer_path)
    ids = tok.encode(text)
    if getattr(tok, "bos", None) is not None:
        ids = [tok.bos] + ids
    return token_windows(ids, seq_length, max_tokens, source=str(path))
