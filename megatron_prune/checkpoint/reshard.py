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
