"""Resharding as pure functions: source TP shards of one layer (or of the embedding / head) -> full tensors in
HF order, which the converter's own `hf_to_megatron_rank` splits for the target layout. No arithmetic happens,
so any TP/PP a -> b is bit-exact, and uneven sources (global-mode pruning) merge because every merge reads sizes
from the shards themselves."""

from __future__ import annotations

from typing import Sequence

import torch

from megatron_prune.checkpoint.convert import merge_tensor
from megatron_prune.checkpoint.keys import EMBEDDING, FINAL_NORM, LAYER_MAPS, OUTPUT, to_local_names
from megatron_prune.config.shape import LlamaShape


def merge_layer(rank_sds: Sequence[dict[str, torch.Tensor]], shape: LlamaShape, local: int, layer: int
                ) -> dict[str, torch.Tensor]:
    """Full HF tensors of global layer `layer`, stored as stage-local layer `local` in every TP shard."""
    sds = [to_local_names(sd) for sd in rank_sds]
    out = {}
    for m in LAYER_MAPS:
        key = m.mcore.format(local)
        merged = merge_tensor(m.kind, [sd[key] for sd in sds], shape)
        out.update({h.format(layer): t for h, t in zip(m.hf, merged)})
    return out


def merge_first_stage(rank_sds: Sequence[dict[str, torch.Tensor]], shape: LlamaShape) -> dict[str, torch.Tensor]:
    (emb,) = merge_tensor(EMBEDDING.kind, [sd[EMBEDDING.mcore] for sd in rank_sds], shape)
    return {EMBEDDING.hf[0]: emb}


def merge_last_stage(rank_sds: Sequence[dict[str, torch.Tensor]], shape: LlamaShape) -> dict[str, torch.Tensor]:
    """Final norm and (untied) output layer. A tied model's output is its embedding, taken from the first stage."""
    (norm,) = merge_tensor(FINAL_NORM.kind, [sd[FINAL_NORM.mcore] for sd in rank_sds], shape)
    out = {FINAL_NORM.hf[0]: norm}
    if not shape.tie_word_embeddings:
        (head,) = merge_tensor(OUTPUT.kind, [sd[OUTPUT.mcore] for sd in rank_sds], shape)
        out[OUTPUT.hf[0]] = head
    return out


def layer_of(hf_key: str) -> int | None:
    """Global layer index of an HF key, None for embedding / final norm / head."""
    if hf_key.startswith("model.layers."):
        return int(hf_key.split(".")[2])
    return None


# ----------------------------------------------------------------------------- direct path (even shards)
def direct_sources(tp_src: int, tp_dst: int, rank: int) -> tuple[list[int], int, int] | None:
    """Source ranks that make up target rank `rank` when one TP size divides the other, as
    (source ranks, k, j): k source shards concatenated (k >= 1), or one source split in `j`-th of `-k` parts."""
    if tp_src % tp_dst == 0:
        k = tp_src // tp_dst
        return list(range(rank * k, (rank + 1) * k)), k, 0
    if tp_dst % tp_src == 0:
        k = tp_dst // tp_src
        return [rank // k], -k, rank % k
    return None


def combine_shards(kind: str, shards: Sequence[torch.Tensor], k: int, j: int) -> torch.Tensor:
    """Target shard from adjacent even source shards in Megatron layout, without building the full tensor.

    k > 0: concatenate k consecutive source shards; k < 0: take part j of -k of one source shard. Valid because
    every kind keeps whole query groups / contiguous channel ranges per rank (vocab only when the padding agrees)."""
    from megatron_prune.checkpoint import layout

    if kind == "replicated":
        return layout.split_replicated(shards[0], 1, 0)
    if k > 0:
        if kind == "row":
            return torch.cat(list(shards), dim=1)
        if kind == "fc1":
            gates, ups = zip(*(s.chunk(2) for s in shards))
            return torch.cat([*gates, *ups])
        return torch.cat(list(shards)) if len(shards) > 1 else layout.split_replicated(shards[0], 1, 0)
    (src,) = shards
    if kind == "row":
        return layout.split_row(src, -k, j)
    if kind == "fc1":
        gate, up = src.chunk(2)
        return layout.split_fc1(gate, up, -k, j)
    return layout.split_column(src, -k, j)  # column, vocab, qkv (groups per source rank divisible by -k)
