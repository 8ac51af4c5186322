"""A tokenizer on disk, read into memory: a SentencePiece `.model` file, an HF `tokenizer.json`, or an HF tokenizer
directory (which may hold both, as LLaMA-2's does: then both are pruned with one map).

`TokenizerSource.read` does the I/O; fingerprinting, planning the kept ids and producing the pruned files are pure.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from megatron_prune.errors import UserError
from megatron_prune.vocab import hf_tokenizer, spm
from megatron_prune.vocab.slice import VocabMap, config_token_ids, remap_config_ids

SPM_NAME, HF_NAME = "tokenizer.model", "tokenizer.json"
# Files of an HF tokenizer directory carried into the output, renumbered where they hold ids.
SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "generation_config.json",
              "chat_template.jinja", "chat_template.json")
# Files that describe the old vocabulary and that this tool cannot rewrite: never carried along.
STALE_FILES = ("vocab.json", "merges.txt")


class TokenizerFileError(UserError, ValueError):
    """A tokenizer path that cannot be read or pruned; the message names it."""


@dataclass
class TokenizerSource:
    path: str
    spm_model: Any = None          # sentencepiece ModelProto
    tj: dict | None = None         # parsed tokenizer.json
    side: dict[str, bytes] = field(default_factory=dict)
    files_sha256: dict[str, str] = field(default_factory=dict)
    _direct: Callable[[int], list[int]] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def read(cls, path: str | Path) -> "TokenizerSource":
        p = Path(path)
        if p.is_dir():
            files = {n: p / n for n in (SPM_NAME, HF_NAME, *SIDE_FILES) if (p / n).is_file()}
            if SPM_NAME not in files and HF_NAME not in files:
                raise TokenizerFileError(f"{p}: holds neither {SPM_NAME} nor {HF_NAME}")
        elif p.is_file():
            files = {HF_NAME: p} if p.name == HF_NAME else {SPM_NAME: p}
        else:
            raise TokenizerFileError(f"tokenizer {p}: no such file or directory")
        raw = {name: f.read_bytes() for name, f in files.items()}
        src = cls(str(p), files_sha256={n: hashlib.sha256(b).hexdigest() for n, b in raw.items()})
        if SPM_NAME in raw:
            src.spm_model = spm.parse_model(raw.pop(SPM_NAME), str(files[SPM_NAME]))
        if HF_NAME in raw:
            try:
                src.tj = json.loads(raw.pop(HF_NAME))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise TokenizerFileError(f"{files[HF_NAME]}: invalid JSON ({e})") from None
        src.side = raw
        src.vocab()  # validates that both files (when present) describe one vocabulary
        return src

    @property
    def kind(self) -> str:
        return "hf" if self.tj is not None else "sentencepiece"

    def vocab(self) -> list[str]:
        """Token strings in id order."""
        hf = hf_tokenizer.tokens(self.tj, f"{self.path}/{HF_NAME}") if self.tj is not None else None
        sp = spm.pieces(self.spm_model) if self.spm_model is not None else None
        if hf is not None and sp is not None and hf != sp:
            diff = next((i for i, (a, b) in enumerate(zip(hf, sp)) if a != b), min(len(hf), len(sp)))
            raise TokenizerFileError(f"{self.path}: {HF_NAME} ({len(hf)} ids) and {SPM_NAME} ({len(sp)} ids) "
                                     f"describe different vocabularies (first difference at id {diff}); "
                                     "remove the one the model was not trained with")
        return hf if hf is not None else sp

    def fingerprint(self) -> dict[str, Any]:
        """What counts files record: the vocabulary's hash decides whether counts fit a tokenizer."""
        vocab = self.vocab()
        digest = hashlib.sha256("\n".join(vocab).encode("utf-8", "surrogatepass")).hexdigest()
        return {"path": self.path, "kind": self.kind, "vocab_size": len(vocab), "vocab_sha256": digest,
                "files_sha256": dict(self.files_sha256)}

    # ------------------------------------------------------------------ planning and pruning (pure)
    def always_keep(self) -> set[int]:
        keep: set[int] = set()
        if self.spm_model is not None:
            keep |= spm.always_keep(self.spm_model)
        if self.tj is not None:
            keep |= hf_tokenizer.always_keep(self.tj)
        for name, data in self.side.items():
            keep |= side_file_ids(name, data)
        return keep

    def closure(self, ids: Iterable[int]) -> set[int]:
        """Add the pieces kept tokens are merged through, for every file present, to a fixed point."""
        return spm.closure(ids, self._derivations())

    def needs(self, i: int) -> set[int]:
        """Id `i` and every piece it is merged through: what keeping `i` costs in the vocabulary."""
        return self.closure((i,))

    def _derivations(self) -> Callable[[int], list[int]]:
        """Both files' merge derivations in one function (a LLaMA-2 directory must stay consistent in both)."""
        if self._direct is None:
            parts = ([spm.derivations(self.spm_model)] if self.spm_model is not None else []) + (
                [hf_tokenizer.derivations(self.tj)] if self.tj is not None else [])
            self._direct = lambda i: [j for f in parts for j in f(i)]
        return self._direct

    def pruned_files(self, vmap: VocabMap) -> dict[str, bytes]:
        """Output file name -> content of the pruned tokenizer (both kinds when both are present)."""
        out: dict[str, bytes] = {}
        if self.spm_model is not None:
            model = spm.prune_model(self.spm_model, vmap.kept)
            spm.check_loadable(model)
            out[SPM_NAME] = model.SerializeToString()  # a given `foo.model` is written as tokenizer.model
        if self.tj is not None:
            tj = hf_tokenizer.prune_tokenizer_json(self.tj, vmap)
            hf_tokenizer.check_loadable(tj)
            out[HF_NAME] = _json_bytes(tj, indent=None)
        for name, data in self.side.items():
            out[name] = remap_side_file(name, data, vmap)
        return out


def remap_side_file(name: str, data: bytes, vmap: VocabMap) -> bytes:
    """Renumber the ids a side file holds (tokenizer_config.json, added_tokens.json, generation_config.json)."""
    if name not in ("tokenizer_config.json", "added_tokens.json", "generation_config.json"):
        return data
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerFileError(f"{name}: invalid JSON ({e})") from None
    if name == "tokenizer_config.json":
        obj = hf_tokenizer.remap_tokenizer_config(obj, vmap)
    elif name == "added_tokens.json":
        obj = hf_tokenizer.remap_added_tokens(obj, vmap)
    else:
        obj = remap_config_ids(obj, vmap)
    return _json_bytes(obj)


def _json_bytes(obj: Any, indent: int | None = 2) -> bytes:
    return (json.dumps(obj, indent=indent, ensure_ascii=False) + "\n").encode("utf-8")


def side_file_ids(name: str, data: bytes) -> set[int]:
    """Ids a side file refers to: they are kept, so that the file stays valid after renumbering."""
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return set()
    if name == "tokenizer_config.json" and isinstance(obj.get("added_tokens_decoder"), dict):
        return {int(k) for k in obj["added_tokens_decoder"]}
    if name == "added_tokens.json":
        return {int(v) for v in obj.values() if isinstance(v, int)}
    if name == "generation_config.json":
        return config_token_ids(obj)
    return set()
