"""Is a Megatron checkpoint what its metadata says it is? One check for every reader (export, reshard, prune,
prune-vocab, training and eval loads), run before any output is written. Pure: it is handed the states and shapes
(checkpoint.megatron_io reads the files).

The metadata (`megatron_prune.json`, or Megatron-LM's args) is trusted only once the tensors agree with it:
- each rank file sits in the folder of the rank it was written for (the rank record `save_rank` adds; older
  files without one are accepted, their folder name is the truth);
- each stage holds exactly the layers the metadata implies (an edited `num_layers` would drop or invent layers);
- each tensor has the shape the metadata implies for its TP rank, computed by the layout's own split functions
  on thin stand-ins (checkpoint.layout owns the rules; nothing is re-derived here);
- a torch_dist checkpoint holds every global tensor the metadata implies, of the TP=1 shape (its layers stacked).

Also the finite check (NaN / Inf) used while tensors are copied: a sum is one cheap pass that propagates any
non-finite value; only when it is not finite are the elements looked at (a sum may overflow on finite data).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch

from megatron_prune.checkpoint.convert import split_tensor
from megatron_prune.checkpoint.errors import CheckpointError
from megatron_prune.checkpoint.keys import (dist_name, hf_expected_shapes, stage_layers, stage_tensor_maps,
                                            to_local_names)
from megatron_prune.checkpoint.meta import CheckpointMeta

RANK_RECORD = "megatron_prune_rank"  # {"tp_rank", "pp_rank", "tp", "pp"}: which rank this file was written for
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


class NonFiniteError(CheckpointError):
    """A tensor holds NaN or Inf (pass --allow-non-finite to copy it anyway)."""


# ----------------------------------------------------------------------------- rank record
def rank_record(tp_rank: int, pp_rank: int, tp: int | None, pp: int) -> dict[str, int | None]:
    return {"tp_rank": tp_rank, "pp_rank": pp_rank, "tp": tp, "pp": pp}


def check_rank_record(path: Path, state: Mapping[str, Any], tp_rank: int, pp_rank: int, tp: int, pp: int) -> None:
    """The folder a rank file sits in is the truth; a file recorded for another rank was moved or swapped."""
    if RANK_RECORD not in state:
        return  # written before rank records existed (or by Megatron-LM): accepted
    rec = state[RANK_RECORD]
    want = rank_record(tp_rank, pp_rank, tp, pp)
    if not isinstance(rec, Mapping) or not all(type(rec.get(k)) is int for k in ("tp_rank", "pp_rank", "pp")) \
            or not (rec.get("tp") is None or type(rec.get("tp")) is int):
        raise CheckpointError(f"{path}: invalid rank record {RANK_RECORD}={rec!r} (expected integers tp_rank, "
                              f"pp_rank, tp, pp)")
    got = {k: rec.get(k) for k in want}
    if got["tp"] is None:
        got["tp"] = tp
    if got != want:
        raise CheckpointError(f"{path}: written as tp rank {got['tp_rank']}, pp rank {got['pp_rank']} of tp="
                              f"{got['tp']}, pp={got['pp']}, but it sits in the folder of tp rank {tp_rank}, pp "
                              f"rank {pp_rank} of tp={tp}, pp={pp} (rank folders swapped or renamed?)")


# ----------------------------------------------------------------------------- expected shapes
def _full_shapes(shape) -> dict[str, tuple[int, ...]]:
    return hf_expected_shapes(shape)


def _thin(full: tuple[int, ...], kind: str) -> torch.Tensor:
    """A stand-in for an HF tensor with only the split dim at full size (the other is 1): the layout's split
    functions run on it in microseconds and a few KiB (meta-device tensors would import torch._dynamo, ~1 s)."""
    if len(full) == 1:
        return torch.empty(full)
    return torch.empty(1, full[1]) if kind == "row" else torch.empty(full[0], 1)


def _split_shape(kind: str, hf_keys, full: dict[str, tuple[int, ...]], tp: int, rank: int, shape, padded: int):
    out = split_tensor(kind, [_thin(full[k], kind) for k in hf_keys], tp, rank, shape, padded).shape
    first = full[hf_keys[0]]
    if len(first) == 1:
        return tuple(out)
    return (first[0], out[1]) if kind == "row" else (out[0], first[1])


def _uneven_layer_shape(meta: CheckpointMeta, layer: int, tp_rank: int):
    """Global-mode pruning: TP rank r of layer l holds what TP=1 of a model with r's groups and FFN would hold."""
    s, sizes = meta.shape, meta.rank_sizes
    groups, ffn = sizes["groups"][layer][tp_rank], sizes["ffn"][layer][tp_rank]
    if groups < 1 or ffn < 1:
        return None  # an empty shard: nothing to compare against the split rules
    return s.replace(num_query_groups=groups, num_attention_heads=groups * s.heads_per_group, ffn_hidden_size=ffn)


def expected_rank_shapes(meta: CheckpointMeta, tp_rank: int, pp_rank: int) -> dict[str, tuple[int, ...] | None]:
    """{local-spec key: shape} of every tensor of rank (tp_rank, pp_rank), as the metadata implies it (None: an
    uneven shard whose shape is not checked)."""
    s = meta.shape
    full = _full_shapes(s)
    out: dict[str, tuple[int, ...] | None] = {}
    layers = stage_layers(s.num_layers, meta.pp, pp_rank)
    per_layer: dict[int, Any] = {}
    for mkey, hf_keys, kind in stage_tensor_maps(s.num_layers, meta.pp, pp_rank, s.tie_word_embeddings):
        m = _LAYER.match(mkey)
        if meta.rank_sizes and m:
            layer = layers[int(m.group(1))]
            if layer not in per_layer:
                ls = _uneven_layer_shape(meta, layer, tp_rank)
                per_layer[layer] = (ls, _full_shapes(ls)) if ls else None
            if per_layer[layer] is None:
                out[mkey] = None
                continue
            ls, lfull = per_layer[layer]
            out[mkey] = _split_shape(kind, hf_keys, lfull, 1, 0, ls, meta.padded_vocab_size)
        else:
            out[mkey] = _split_shape(kind, hf_keys, full, meta.tp, tp_rank, s, meta.padded_vocab_size)
    return out


# ----------------------------------------------------------------------------- one rank's state
def _layer_count(keys) -> int:
    return len({int(m.group(1)) for k in keys if (m := _LAYER.match(k))})


def check_rank_tensors(path: Path, model: Mapping[str, Any], meta: CheckpointMeta, tp_rank: int, pp_rank: int,
                       meta_source: str) -> None:
    """Keys and shapes of one rank's model state dict against the metadata (`meta_source` names where it is)."""
    s = meta.shape
    tensors = {k: v for k, v in to_local_names(dict(model)).items() if isinstance(v, torch.Tensor)}
    want = expected_rank_shapes(meta, tp_rank, pp_rank)
    n_want, n_got = len(stage_layers(s.num_layers, meta.pp, pp_rank)), _layer_count(tensors)
    if n_got != n_want:
        raise CheckpointError(f"{path}: holds {n_got} layers, but {meta_source} implies {n_want} (num_layers="
                              f"{s.num_layers}, pp={meta.pp}, stage {pp_rank})")
    missing, extra = sorted(want.keys() - tensors.keys()), sorted(tensors.keys() - want.keys())
    if missing or extra:
        what = f"{len(missing)} tensors missing, e.g. {missing[:2]}" if missing else \
            f"unexpected tensors, e.g. {extra[:2]}"
        raise CheckpointError(f"{path}: {what} (vs {meta_source}: num_layers={s.num_layers}, pp={meta.pp}, "
                              f"stage {pp_rank})")
    for key, shape in want.items():
        got = tuple(tensors[key].shape)
        if shape is not None and got != shape:
            raise CheckpointError(
                f"{path}: tensor {key!r} has shape {list(got)}, but {meta_source} implies {list(shape)} for tp rank "
                f"{tp_rank} of {meta.tp} (hidden={s.hidden_size}, heads={s.num_attention_heads}, groups="
                f"{s.num_query_groups}, kv_channels={s.kv_channels}, ffn={s.ffn_hidden_size}, padded vocab="
                f"{meta.padded_vocab_size})")


def check_rank_state(path: Path, state: Mapping[str, Any], meta: CheckpointMeta, tp_rank: int, pp_rank: int,
                     meta_source: str) -> None:
    """Everything one rank file must agree on with its folder and the checkpoint's metadata (`meta_source` names
    where that metadata came from, for the messages)."""
    if not isinstance(state, Mapping) or not isinstance(state.get("model"), Mapping):
        raise CheckpointError(f"{path}: not a Megatron rank file (no 'model' state dict)")
    check_rank_record(path, state, tp_rank, pp_rank, meta.tp, meta.pp)
    check_rank_tensors(path, state["model"], meta, tp_rank, pp_rank, meta_source)


# ----------------------------------------------------------------------------- torch_dist global tensors
def expected_dist_shapes(meta: CheckpointMeta) -> dict[str, tuple[int, ...]]:
    """{torch_dist key: global shape}: the TP=1 tensors of one stage holding every layer (stacked on axis 0)."""
    s = meta.shape
    out = {}
    for mkey, hf_keys, kind in stage_tensor_maps(s.num_layers, 1, 0, s.tie_word_embeddings):
        one = _split_shape(kind, hf_keys, _full_shapes(s), 1, 0, s, meta.padded_vocab_size)
        key = dist_name(mkey)
        out[key] = (s.num_layers, *one) if key != mkey else one
    return out


def check_dist_shapes(path: Path, tensors: Mapping[str, tuple[int, ...]], meta: CheckpointMeta,
                      meta_source: str) -> None:
    """The global tensors of a torch_dist checkpoint (`tensors`: key -> shape, from its index) against the meta.
    The vocab tables may hold any padding (rows past the vocabulary); everything else must match exactly."""
    s = meta.shape
    for key, want in expected_dist_shapes(meta).items():
        if key not in tensors:
            raise CheckpointError(f"{path}: no tensor {key!r}, which {meta_source} implies (num_layers="
                                  f"{s.num_layers}, tied embeddings={s.tie_word_embeddings})")
        got = tuple(tensors[key])
        vocab = key.endswith("word_embeddings.weight") or key == "output_layer.weight"
        if got != want and not (vocab and len(got) == 2 and got[1] == want[1] and got[0] >= s.vocab_size):
            raise CheckpointError(
                f"{path}: tensor {key!r} has global shape {list(got)}, but {meta_source} implies {list(want)} "
                f"(layers={s.num_layers}, hidden={s.hidden_size}, heads={s.num_attention_heads}, groups="
                f"{s.num_query_groups}, kv_channels={s.kv_channels}, ffn={s.ffn_hidden_size}, vocab={s.vocab_size})")


# ----------------------------------------------------------------------------- finite values
def is_finite(t: torch.Tensor) -> bool:
    """True when every element is finite. Fast path: one sum (NaN and Inf propagate); exact check otherwise."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def describe_non_finite(t: torch.Tensor) -> str:
    nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    return f"{nan} NaN and {inf} Inf of {t.numel()} values"
