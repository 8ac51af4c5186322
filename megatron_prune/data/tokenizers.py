"""One small tokenizer interface over the two kinds LLaMA checkpoints ship.

* a SentencePiece ``.model`` file (LLaMA-2 style, e.g. ``tokenizer.model``);
* an HF tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json``, LLaMA-3 style),
  loaded with ``transformers.AutoTokenizer``.

``encode`` never adds BOS/EOS: the preprocessing pipeline decides about EOD itself, as
Megatron-LM's ``tools/preprocess_data.py`` does. The object also satisfies what megatron-core's
``GPTDataset`` reads from its tokenizer (``eod``, ``vocab_size``, ``unique_identifiers``,
``tokenize``/``detokenize``). It deliberately has no ``pad`` attribute: LLaMA has no pad token,
and megatron-core then falls back to a pad id that can never occur in the data.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence
from megatron_prune.errors import UserError


HF_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class TokenizerError(UserError, ValueError):
    """A tokenizer path that cannot be loaded; the message names the path and what was expected."""


class Tokenizer(ABC):
    """Common interface; build one with :func:`load_tokenizer`."""

    kind: str = ""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS or EOS."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens are kept)."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (every id is < vocab_size)."""

    @property
    @abstractmethod
    def _eos_id(self) -> int | None: ...

    @property
    @abstractmethod
    def bos(self) -> int | None:
        """BOS id, or None when the tokenizer defines none."""

    @property
    def eod(self) -> int:
        """End-of-document id (the EOS token); raises if the tokenizer defines none."""
        eos = self._eos_id
        if eos is None:
            raise TokenizerError(f"tokenizer {self.path} defines no EOS token, so no end-of-document id "
                                 "(for an HF directory set eos_token in tokenizer_config.json)")
        return eos

    @property
    def eos(self) -> int:
        return self.eod

    @property
    def unique_identifiers(self) -> OrderedDict[str, Any]:
        # megatron-core hashes these into its dataset cache names: the same data tokenized by
        # a different tokenizer file must not reuse a cached index.
        return OrderedDict(cls=type(self).__name__, kind=self.kind, path=self.path, vocab_size=self.vocab_size)

    # Megatron's MegatronTokenizer spelling of encode/decode.
    def tokenize(self, text: str) -> list[int]:
        return self.encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.decode(ids)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model file (LLaMA-2 ``tokenizer.model``)."""

    kind = "sentencepiece"

    def __init__(self, path: str) -> None:
        super().__init__(path)
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(self.path)
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(f"tokenizer {path} is not a SentencePiece .model file "
                                 f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None

    def encode(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return int(self._sp.GetPieceSize())

    @property
    def _eos_id(self) -> int | None:
        eos = int(self._sp.eos_id())
        return eos if eos >= 0 else None  # a model trained with eos_id=-1 has none

    @property
    def bos(self) -> int | None:
        bos = int(self._sp.bos_id())
        return bos if bos >= 0 else None


class HFTokenizer(Tokenizer):
    """An HF tokenizer directory, loaded with ``transformers.AutoTokenizer`` (offline)."""

    kind = "hf"

    def __init__(self, path: str) -> None:
        super().__init__(path)
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except Exception as exc:  # transformers raises many types (OSError, ValueError, KeyError ...)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TokenizerError(f"tokenizer directory {path} could not be loaded as an HF tokenizer "
                                 f"(expected tokenizer.json / tokenizer_config.json): {first}") from None
        # Whole documents are longer than the model's context; that is fine here, so silence
        # the "sequence length is longer than the specified maximum" warning.
        self._tok.model_max_length = 1 << 62

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return len(self._tok)  # base vocabulary plus added special tokens (LLaMA-3: 128256)

    @property
    def _eos_id(self) -> int | None:
        return self._tok.eos_token_id

    @property
    def bos(self) -> int | None:
        return self._tok.bos_token_id


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Load a SentencePiece model file, or an HF tokenizer directory (or its tokenizer.json).

    Raises :class:`TokenizerError` naming the path and what was expected."""
    p = Path(path)
    if p.is_dir():
        if not any((p / name).is_file() for name in HF_FILES):
            raise TokenizerError(f"tokenizer directory {path} holds none of {', '.join(HF_FILES)} "
                                 "(expected an HF tokenizer directory or a SentencePiece .model file)")
        return HFTokenizer(str(p))
    if p.is_file():
        if p.name == "tokenizer.json":
            return HFTokenizer(str(p.parent))
        return SentencePieceTokenizer(str(p))
    raise TokenizerError(f"tokenizer path {path} does not exist "
                         "(expected a SentencePiece .model file or an HF tokenizer directory)")
