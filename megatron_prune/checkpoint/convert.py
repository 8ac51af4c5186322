"""HF <-> Megatron as pure functions over (lazy) tensors: no files, no processes, no progress bars.

hf_to_megatron_rank builds one (tp_rank, pp_rank) state dict, reading only the slices that rank needs.
megatron_to_hf_stage merges the TP shards of one pipeline stage back into HF tensors; it is the inverse.
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping, Sequence

import torch

from megatron_prune.errors import InputError
from megatron_prune.checkpoint import layout
from megatron_prune.checkpoint.keys import (EMBEDDING, OUTPUT, stage_extra_state_keys, stage_layers,
                                            stage_tensor_maps, to_local_names, to_te_names)
from megatron_prune.config.shape import LlamaShape

Getter = Callable[[str], "layout.Sliceable"]


def split_tensor(kind: str, sources: Sequence, tp: int, rank: int, shape: LlamaShape, padded_vocab: int
                 ) -> torch.Tensor:
    if kind == "qkv":
        return layout.split_qkv(*sources, tp, rank, shape.num_query_groups, shape.kv_channels)
    if kind == "fc1":
        return layout.split_fc1(*sources, tp, rank)
    (src,) = sources
    if kind == "vocab":
        return layout.split_vocab(src, tp, rank, padded_vocab)
    return {"replicated": layout.split_replicated, "column": layout.split_column,
            "row": layout.split_row}[kind](src, tp, rank)


def merge_tensor(kind: str, shards: Sequence[torch.Tensor], shape: LlamaShape) -> tuple[torch.Tensor, ...]:
    """Inverse of split_tensor: the source tensors in HF order (q, k, v for qkv; gate, up for fc1)."""
    if kind == "qkv":
        return layout.merge_qkv(shards, shape.heads_per_group, shape.kv_channels)
    if kind == "fc1":
        return layout.merge_fc1(shards)
    if kind == "vocab":
        return (layout.merge_vocab(shards, shape.vocab_size),)
    return ({"replicated": layout.merge_replicated, "column": layout.merge_column,
             "row": layout.merge_row}[kind](shards),)


def hf_to_megatron_rank(get: Getter, shape: LlamaShape, tp: int, pp: int, tp_rank: int, pp_rank: int,
                        padded_vocab: int, dtype: torch.dtype | None = None, te_names: bool = False,
                        on_tensor: Callable[[str, torch.Tensor], None] | None = None
                        ) -> dict[str, torch.Tensor | None]:
    """The megatron-core state dict of rank (tp_rank, pp_rank). `get(hf_key)` returns a sliceable tensor;
    `on_tensor(megatron_key, tensor)` sees each tensor as soon as it is made (progress, finite check)."""
    sd: dict[str, torch.Tensor | None] = {}
    for mkey, hf_keys, kind in stage_tensor_maps(shape.num_layers, pp, pp_rank, shape.tie_word_embeddings):
        t = split_tensor(kind, [get(k) for k in hf_keys], tp, tp_rank, shape, padded_vocab)
        sd[mkey] = t.to(dtype) if dtype is not None and t.dtype != dtype else t
        if on_tensor:
            on_tensor(mkey, sd[mkey])
    for key in stage_extra_state_keys(shape.num_layers, pp, pp_rank):
        sd[key] = None
    return to_te_names(sd) if te_names else sd


def megatron_to_hf_stage(rank_sds: Sequence[dict[str, torch.Tensor]], shape: LlamaShape, pp: int, pp_rank: int,
                         dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """HF tensors of one pipeline stage from its TP shards (any TP size; uneven shards allowed). A shard may be a
    lazy Mapping (not a dict) in local-spec names: its tensors are then looked up one at a time, in stage order."""
    sds = [sd if isinstance(sd, Mapping) and not isinstance(sd, dict) else to_local_names(sd) for sd in rank_sds]
    layers = stage_layers(shape.num_layers, pp, pp_rank)
    for mkey, hf_keys, kind in stage_tensor_maps(shape.num_layers, pp, pp_rank, shape.tie_word_embeddings):
        if mkey == OUTPUT.mcore and hf_keys == EMBEDDING.hf:
            continue  # the last stage's copy of a tied embedding: HF stores it once
        for i, sd in enumerate(sds):
            if mkey not in sd:
                raise InputError(f"TP rank {i} of stage {pp_rank} lacks {mkey!r} "
                                 f"(layers {layers.start}-{layers.stop - 1})")
        merged = merge_tensor(kind, [sd[mkey] for sd in sds], shape)
        for key, t in zip(hf_keys, merged):
            yield key, (t.to(dtype) if dtype is not None and t.dtype != dtype else t).contiguous()
