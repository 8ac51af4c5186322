"""The old -> new id map and vocab slicing of state dicts (Megatron TP shards, HF tensors), as pure functions.

Kept ids are sorted in old-id order, so a token's new id is its rank among the kept ids: the map is monotone,
specials at the front stay there, and a table's new rows are `old_table[kept]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from megatron_prune.errors import InputError
from megatron_prune.checkpoint import layout
from megatron_prune.checkpoint.keys import EMBEDDING, OUTPUT

HF_VOCAB_KEYS = (EMBEDDING.hf[0], OUTPUT.hf[0])  # model.embed_tokens.weight, lm_head.weight
MEGATRON_VOCAB_KEYS = (EMBEDDING.mcore, OUTPUT.mcore)  # same names in the local and Transformer Engine specs
# HF config.json / generation_config.json fields that hold token ids.
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "decoder_start_token_id")


@dataclass(frozen=True)
class VocabMap:
    old_size: int
    kept: tuple[int, ...]  # old ids, ascending; the new id of kept[i] is i

    def __post_init__(self) -> None:
        object.__setattr__(self, "kept", tuple(int(i) for i in self.kept))
        if not self.kept:
            raise InputError(f"a vocab map must keep at least one id (old vocab {self.old_size})")
        bad = [i for i in self.kept if not 0 <= i < self.old_size]
        if bad:
            raise InputError(f"kept ids {bad[:5]} out of range for old vocab {self.old_size}")
        if any(a >= b for a, b in zip(self.kept, self.kept[1:])):
            raise InputError("kept ids must be strictly ascending (the old -> new map is monotone)")

    @property
    def new_size(self) -> int:
        return len(self.kept)

    def old_to_new_dict(self) -> dict[int, int]:
        return {old: new for new, old in enumerate(self.kept)}

    def old_to_new(self) -> list[int]:
        """One entry per old id: its new id, or -1 when dropped."""
        out = [-1] * self.old_size
        for new, old in enumerate(self.kept):
            out[old] = new
        return out

    def map_ids(self, ids: Iterable[int]) -> list[int]:
        """New ids of old ids; a dropped id raises KeyError naming it."""
        table = self.old_to_new_dict()
        out = []
        for i in ids:
            if int(i) not in table:
                raise InputError(f"token id {int(i)} was dropped from the vocabulary")
            out.append(table[int(i)])
        return out

    def index(self) -> torch.Tensor:
        return torch.tensor(self.kept, dtype=torch.long)

    def to_json(self, **extra: Any) -> dict[str, Any]:
        return {"format": 1, "old_vocab_size": self.old_size, "new_vocab_size": self.new_size, **extra,
                "new_to_old": list(self.kept), "old_to_new": self.old_to_new()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "VocabMap":
        return cls(int(d["old_vocab_size"]), tuple(d["new_to_old"]))


def slice_rows(table: torch.Tensor, vmap: VocabMap) -> torch.Tensor:
    """Rows of the kept ids; `table` may have rows past the tokenizer's vocabulary (never produced ids)."""
    if table.shape[0] < vmap.old_size:
        raise InputError(f"vocab table has {table.shape[0]} rows, fewer than the tokenizer's {vmap.old_size} ids")
    return table.index_select(0, vmap.index())


def slice_vocab_shards(shards: Sequence[torch.Tensor], true_vocab: int, vmap: VocabMap, new_padded: int
                       ) -> list[torch.Tensor]:
    """TP shards of a padded vocab table -> TP shards (as many) of the sliced table padded to `new_padded`."""
    full = layout.merge_vocab(shards, true_vocab)
    kept = slice_rows(full, vmap)
    return [layout.split_vocab(kept, len(shards), r, new_padded) for r in range(len(shards))]


def slice_stage(rank_sds: Sequence[dict[str, Any]], vmap: VocabMap, true_vocab: int, new_padded: int,
                expected: Sequence[str]) -> list[dict[str, Any]]:
    """New state dicts for the TP ranks of one pipeline stage: `expected` vocab keys sliced, the rest as is."""
    out = [dict(sd) for sd in rank_sds]
    for key in expected:
        missing = [r for r, sd in enumerate(rank_sds) if key not in sd]
        if missing:
            raise InputError(f"vocab tensor {key!r} missing from TP rank(s) {missing}")
        for sd, shard in zip(out, slice_vocab_shards([sd[key] for sd in rank_sds], true_vocab, vmap, new_padded)):
            sd[key] = shard
    return out


def stage_vocab_keys(pp: int, pp_rank: int, tied: bool) -> list[str]:
    """Vocab tensors held by a pipeline stage: the embedding on the first, the output layer (a tied model's own
    copy when PP > 1) on the last."""
    keys = [EMBEDDING.mcore] if pp_rank == 0 else []
    if pp_rank == pp - 1 and (not tied or pp > 1):
        keys.append(OUTPUT.mcore)
    return keys


def config_token_ids(cfg: dict[str, Any]) -> set[int]:
    """Token ids a config refers to (they must survive pruning)."""
    ids: set[int] = set()
    for field in TOKEN_ID_FIELDS:
        value = cfg.get(field)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and v >= 0:
                ids.add(v)
    return ids


def remap_config_ids(cfg: dict[str, Any], vmap: VocabMap) -> dict[str, Any]:
    """A copy of an HF config / generation config with its token-id fields renumbered."""
    out = dict(cfg)
    for field in TOKEN_ID_FIELDS:
        value = cfg.get(field)
        if isinstance(value, list):
            out[field] = vmap.map_ids(v for v in value if isinstance(v, int))
        elif isinstance(value, int) and value >= 0:
            out[field] = vmap.map_ids([value])[0]
    return out
