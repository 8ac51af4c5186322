"""HF `tokenizer.json` (BPE model) surgery, pure functions over the parsed JSON (no file I/O).

Pruning rebuilds `model.vocab` with the new ids, keeps only the merges whose two parts and result are all kept
(the `tokenizers` loader rejects any other), and renumbers `added_tokens` and the post-processor's special ids.
Always kept: added tokens, the unknown token, the 256-character byte-level alphabet (byte-level models), the
`<0xXX>` pieces (byte_fallback models): whatever is dropped is still encodable through them; and "▁" in
SentencePiece-style tokenizers (see `always_keep`).

As with SentencePiece BPE, a kept token may be reachable only through a dropped one; `merge_closure` adds the
characters and intermediates of every kept token's merge sequence (lowest merge rank first, leftmost on ties, as
`tokenizers` applies them), so text whose original tokens are all kept tokenizes identically after pruning.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Callable, Iterable

from megatron_prune.errors import UserError
from megatron_prune.vocab.slice import VocabMap
from megatron_prune.vocab.spm import SPACE, closure


class HFTokenizerError(UserError, ValueError):
    """A tokenizer.json this module cannot prune; the message says why."""


def _model(tj: dict, name: str = "tokenizer.json") -> dict:
    model = tj.get("model") or {}
    if model.get("type", "BPE" if "merges" in model else None) != "BPE":
        raise HFTokenizerError(f"{name}: model type {model.get('type')!r} is not supported (only BPE, as in "
                               "LLaMA tokenizers)")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise HFTokenizerError(f"{name}: BPE with continuing_subword_prefix / end_of_word_suffix is not supported")
    return model


def tokens(tj: dict, name: str = "tokenizer.json") -> list[str]:
    """Token strings in id order (model vocabulary and added tokens); ids must be 0..n-1 without gaps."""
    by_id: dict[int, str] = {int(i): t for t, i in _model(tj, name)["vocab"].items()}
    for added in tj.get("added_tokens") or ():
        by_id.setdefault(int(added["id"]), added["content"])
    if sorted(by_id) != list(range(len(by_id))):
        missing = sorted(set(range(max(by_id) + 1)) - set(by_id))[:5]
        raise HFTokenizerError(f"{name}: token ids are not contiguous (missing e.g. {missing})")
    return [by_id[i] for i in range(len(by_id))]


def _merge_pairs(model: dict) -> list[tuple[str, str]]:
    """Merges in rank order; tokenizer.json spells them "a b" (older) or ["a", "b"] (newer)."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in model.get("merges", ())]


def byte_level_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel.alphabet()


def _uses_byte_level(tj: dict) -> bool:
    def has(node: Any) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(has(v) for v in node.values())
        return isinstance(node, list) and any(has(v) for v in node)

    return has(tj.get("pre_tokenizer")) or has(tj.get("decoder"))


def always_keep(tj: dict) -> set[int]:
    model = _model(tj)
    vocab = model["vocab"]
    keep = {int(a["id"]) for a in tj.get("added_tokens") or ()}
    if model.get("unk_token") in vocab:
        keep.add(vocab[model["unk_token"]])
    if model.get("byte_fallback"):
        keep |= {vocab[t] for t in (f"<0x{b:02X}>" for b in range(256)) if t in vocab}
    if _uses_byte_level(tj):
        keep |= {vocab[c] for c in byte_level_alphabet() if c in vocab}
    if SPACE in vocab and _uses_space_symbol(tj):  # as in spm.always_keep: the decoder replaces "▁" before bytes
        keep.add(vocab[SPACE])
    return keep


def _uses_space_symbol(tj: dict) -> bool:
    """SentencePiece-style tokenizers (Metaspace, or Replace(" ", "▁") as in LLaMA-2's conversion)."""
    return any(SPACE in json.dumps(tj.get(k), ensure_ascii=False) for k in ("normalizer", "pre_tokenizer", "decoder"))


def _derivation(token: str, ranks: dict[tuple[str, str], int]) -> list[str] | None:
    """Tokens BPE goes through to build `token`: its characters (unlike SentencePiece, `tokenizers` turns a
    character outside the vocabulary into byte-fallback / unknown tokens before merging, so they must stay) and
    every merge result; None when the merges do not end in `token`."""
    symbols = list(token)
    formed: list[str] = list(symbols)
    while len(symbols) > 1:
        best, best_rank = -1, 0
        for i in range(len(symbols) - 1):
            rank = ranks.get((symbols[i], symbols[i + 1]))
            if rank is not None and (best < 0 or rank < best_rank):
                best, best_rank = i, rank
        if best < 0:
            return None
        symbols[best:best + 2] = [symbols[best] + symbols[best + 1]]
        formed.append(symbols[best])
    return formed if symbols == [token] else None


def derivations(tj: dict) -> Callable[[int], list[int]]:
    """id -> ids of the characters and merge results BPE goes through to build that token (tables built once)."""
    model = _model(tj)
    vocab = model["vocab"]
    ranks: dict[tuple[str, str], int] = {}
    for r, pair in enumerate(_merge_pairs(model)):
        ranks.setdefault(pair, r)
    names = tokens(tj)

    def formed(i: int) -> list[int]:
        if names[i] not in vocab or len(names[i]) < 2:  # added tokens are never merged
            return []
        return [vocab[t] for t in _derivation(names[i], ranks) or () if t in vocab]

    return formed


def merge_closure(tj: dict, ids: Iterable[int]) -> set[int]:
    return closure(ids, derivations(tj))


def prune_tokenizer_json(tj: dict, vmap: VocabMap) -> dict:
    """A pruned copy of the tokenizer.json dict."""
    model = _model(tj)
    old_to_new = vmap.old_to_new_dict()
    out = copy.deepcopy(tj)
    new_vocab = {t: old_to_new[i] for t, i in model["vocab"].items() if i in old_to_new}
    out["model"]["vocab"] = dict(sorted(new_vocab.items(), key=lambda kv: kv[1]))
    kept_merges = [m for m, (a, b) in zip(model.get("merges", ()), _merge_pairs(model))
                   if a in new_vocab and b in new_vocab and a + b in new_vocab]
    out["model"]["merges"] = kept_merges
    added = []
    for a in tj.get("added_tokens") or ():
        if int(a["id"]) in old_to_new:
            added.append({**a, "id": old_to_new[int(a["id"])]})
    out["added_tokens"] = added
    out["post_processor"] = remap_post_processor(tj.get("post_processor"), old_to_new)
    return out


def remap_post_processor(node: Any, old_to_new: dict[int, int]) -> Any:
    """Renumber the special-token ids of a post-processor (TemplateProcessing `ids`, Bert/Roberta `[tok, id]`,
    nested `Sequence`s)."""
    if isinstance(node, list):
        if len(node) == 2 and isinstance(node[0], str) and isinstance(node[1], int):  # Bert/Roberta sep / cls
            return [node[0], _mapped(node[1], old_to_new, f"post_processor token {node[0]!r}")]
        return [remap_post_processor(v, old_to_new) for v in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "ids" and isinstance(value, list) and all(isinstance(v, int) for v in value):
            out[key] = [_mapped(v, old_to_new, "post_processor special token") for v in value]
        else:
            out[key] = remap_post_processor(value, old_to_new)
    return out


def _mapped(old: int, old_to_new: dict[int, int], what: str) -> int:
    if old not in old_to_new:
        raise HFTokenizerError(f"{what} has id {old}, which is not kept")
    return old_to_new[old]


def remap_tokenizer_config(cfg: dict, vmap: VocabMap) -> dict:
    """tokenizer_config.json: `added_tokens_decoder` is keyed by id; dropped entries go."""
    out = dict(cfg)
    if isinstance(cfg.get("added_tokens_decoder"), dict):
        old_to_new = vmap.old_to_new_dict()
        out["added_tokens_decoder"] = {str(old_to_new[int(k)]): v for k, v in cfg["added_tokens_decoder"].items()
                                       if int(k) in old_to_new}
    return out


def remap_added_tokens(added: dict[str, int], vmap: VocabMap) -> dict[str, int]:
    """added_tokens.json ({token: id})."""
    old_to_new = vmap.old_to_new_dict()
    return {t: old_to_new[i] for t, i in added.items() if i in old_to_new}


def check_loadable(tj: dict) -> None:
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_str(json.dumps(tj))
    except Exception as e:  # tokenizers raises its own Exception type
        raise HFTokenizerError(f"the pruned tokenizer.json does not load: {e}") from None
