"""Resharding as pure functions over shard sizes and tensors: no files, no processes, no progress bars.

A target tensor is *planned* by running the foundation's own merge (all source shards -> HF order) and split
(HF order -> target rank) for its layout kind on index tensors: every source row (or column, for the `row`
layout) carries its global id, so the split says, for each target row/column, which source rank and row/column
it is. Runs of consecutive ids collapse into `Piece`s; the vocabulary's zero padding comes out as id 0.
So the layout knowledge stays in checkpoint.layout, nothing is computed on the weights (any TP/PP a -> b is
bit-exact), and uneven sources (global-mode pruning) plan like even ones because sizes come from the shards.

The file driver (reshard_files) copies row pieces file to file and assembles the rest with `assemble`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, NamedTuple, Sequence

import torch

from megatron_prune.errors import InputError
from megatron_prune.checkpoint.convert import merge_tensor, split_tensor
from megatron_prune.checkpoint.keys import EMBEDDING, FINAL_NORM, OUTPUT, stage_layers, stage_tensor_maps
from megatron_prune.checkpoint.layout import merge_replicated
from megatron_prune.config.shape import LlamaShape

PAD = -1  # Piece.src of zero padding (vocabulary rows beyond the true vocab)


class Piece(NamedTuple):
    src: int     # source TP rank, or PAD
    start: int   # first row (dim 0) / column (dim 1) in that source shard
    stop: int


@dataclass(frozen=True)
class TensorPlan:
    key: str                    # target key (local-spec name)
    src_stage: int              # source pipeline stage holding the tensor
    src_key: str                # key there (local-spec name; layers are renumbered between stage layouts)
    kind: str                   # layout kind
    src_tp: int                 # source TP size
    dim: int                    # pieces run along rows (0: contiguous bytes of each source) or columns (1)
    pieces: tuple[Piece, ...]
    shape: tuple[int, ...]      # target tensor shape

    def sources(self) -> list[int]:
        """Source TP ranks the target tensor is read from (all of them for replicated tensors: compared)."""
        if self.kind == "replicated":
            return list(range(self.src_tp))
        return sorted({p.src for p in self.pieces if p.src != PAD})


# ----------------------------------------------------------------------------- one tensor
def _index_shards(sizes: Sequence[int], dim: int) -> list[torch.Tensor]:
    """Per source rank r, ids r * M + i + 1 (i = 0..n_r-1; M = max n_r + 1) along `dim` of [n, 1] / [1, n]."""
    m = max(sizes, default=0) + 1
    ids = [torch.arange(n, dtype=torch.int64) + (r * m + 1) for r, n in enumerate(sizes)]
    return [i.view(-1, 1) if dim == 0 else i.view(1, -1) for i in ids]


def _runs(ids: torch.Tensor, sizes: Sequence[int]) -> tuple[Piece, ...]:
    """Collapse target ids (0 = padding) into pieces of consecutive rows of one source rank."""
    ids = ids.flatten()
    n = ids.numel()
    if n == 0:
        return ()
    m = max(sizes) + 1
    pad = ids == 0
    src, local = torch.div(ids - 1, m, rounding_mode="floor"), torch.remainder(ids - 1, m)
    src[pad], local[pad] = PAD, 0
    brk = torch.ones(n, dtype=torch.bool)
    brk[1:] = (src[1:] != src[:-1]) | ((local[1:] != local[:-1] + 1) & ~pad[1:])
    starts = brk.nonzero().flatten().tolist() + [n]
    src_l, local_l = src[starts[:-1]].tolist(), local[starts[:-1]].tolist()
    return tuple(Piece(s, i, i + b - a) for s, i, a, b in zip(src_l, local_l, starts, starts[1:]))


def _expected_lengths(key: str, kind: str, s: LlamaShape) -> tuple[int, ...] | None:
    """Lengths of the merged HF tensors along the split dim, from the checkpoint's shape (None: not checked)."""
    heads, groups, d, ffn = s.num_attention_heads, s.num_query_groups, s.kv_channels, s.ffn_hidden_size
    if kind == "qkv":
        return heads * d, groups * d, groups * d
    if kind == "fc1":
        return ffn, ffn
    if kind == "row":
        return (heads * d,) if "linear_proj" in key else (ffn,)
    if kind == "vocab":
        return (s.vocab_size,)
    return None


def _check_sources(key: str, kind: str, shapes: Sequence[tuple[int, ...]], hidden: int) -> int:
    """The split dim of this kind; every shard must be 2-D with `hidden` on the other dim (norms: [hidden])."""
    if kind == "replicated":
        bad = [r for r, sh in enumerate(shapes) if tuple(sh) != (hidden,)]
        if bad:
            raise InputError(f"{key}: TP rank {bad[0]} has shape {tuple(shapes[bad[0]])}, expected ({hidden},)")
        return 0
    dim = 1 if kind == "row" else 0
    for r, sh in enumerate(shapes):
        if len(sh) != 2 or sh[1 - dim] != hidden:
            raise InputError(f"{key}: TP rank {r} has shape {tuple(sh)}; expected hidden size {hidden} on dim "
                             f"{1 - dim}")
    return dim


def plan_pieces(key: str, kind: str, shapes: Sequence[tuple[int, ...]], shape: LlamaShape, tp: int, rank: int,
                padded_vocab: int) -> tuple[int, tuple[Piece, ...], tuple[int, ...]]:
    """(dim, pieces, target shape) of TP rank `rank` of `tp` for one tensor whose source shards have `shapes`.

    `shape` is the model shape (the same before and after resharding); `padded_vocab` the target's."""
    dim = _check_sources(key, kind, shapes, shape.hidden_size)
    if kind == "replicated":  # every rank holds the whole tensor; the driver checks the copies agree
        return 0, (Piece(0, 0, shapes[0][0]),), tuple(shapes[0])
    sizes = [sh[dim] for sh in shapes]
    merged = merge_tensor(kind, _index_shards(sizes, dim), shape)
    want = _expected_lengths(key, kind, shape)
    got = tuple(t.shape[dim] for t in merged)
    if want is not None and got != want:
        raise InputError(f"{key}: source shards {sizes} merge to {got} along dim {dim}, but the checkpoint's "
                         f"shape needs {want} (heads={shape.num_attention_heads}, groups={shape.num_query_groups}, "
                         f"kv_channels={shape.kv_channels}, ffn={shape.ffn_hidden_size}, vocab={shape.vocab_size})")
    ids = split_tensor(kind, merged, tp, rank, shape, padded_vocab)
    n = ids.shape[dim]
    out_shape = (n, shapes[0][1]) if dim == 0 else (shapes[0][0], n)
    return dim, _runs(ids, sizes), out_shape


# ----------------------------------------------------------------------------- one target rank
def source_location(num_layers: int, src_pp: int, dst_pp: int, pp_rank: int, key: str,
                    hf_keys: tuple[str, ...]) -> tuple[int, str]:
    """(source stage, source key) of target key `key` on target stage `pp_rank`."""
    if key.startswith("decoder.layers."):
        local = int(key.split(".")[2])
        layer = stage_layers(num_layers, dst_pp, pp_rank)[local]
        per = num_layers // src_pp
        return layer // per, key.replace(f"layers.{local}.", f"layers.{layer % per}.", 1)
    if key == OUTPUT.mcore and hf_keys == EMBEDDING.hf:  # tied with PP>1: the output weight is the embedding
        return 0, EMBEDDING.mcore
    if key in (FINAL_NORM.mcore, OUTPUT.mcore):
        return src_pp - 1, key
    return 0, key


def plan_rank(shapes: Mapping[int, Sequence[Mapping[str, tuple[int, ...]]]], shape: LlamaShape, src_pp: int,
              tp: int, pp: int, tp_rank: int, pp_rank: int, padded_vocab: int) -> list[TensorPlan]:
    """Plans of every tensor of target rank (tp_rank, pp_rank); `shapes[stage][src_tp_rank][key]` are the
    source shards' shapes (local-spec keys)."""
    plans = []
    for key, hf_keys, kind in stage_tensor_maps(shape.num_layers, pp, pp_rank, shape.tie_word_embeddings):
        stage, src_key = source_location(shape.num_layers, src_pp, pp, pp_rank, key, hf_keys)
        src_shapes = [sd[src_key] for sd in shapes[stage]]
        dim, pieces, out_shape = plan_pieces(src_key, kind, src_shapes, shape, tp, tp_rank, padded_vocab)
        plans.append(TensorPlan(key, stage, src_key, kind, len(src_shapes), dim, pieces, out_shape))
    return plans


# ----------------------------------------------------------------------------- in memory
def assemble(plan: TensorPlan, shards: Mapping[int, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The target tensor from the source shards of `plan.sources()` (`shards[src_tp_rank]`); replicated copies
    must agree."""
    if plan.kind == "replicated":
        return merge_replicated([shards[r] for r in plan.sources()]).clone()
    parts = []
    for p in plan.pieces:
        if p.src == PAD:
            size = list(plan.shape)
            size[plan.dim] = p.stop - p.start
            parts.append(torch.zeros(size, dtype=dtype))
        else:
            parts.append(shards[p.src].narrow(plan.dim, p.start, p.stop - p.start))
    return torch.cat(parts, dim=plan.dim) if parts else torch.empty(plan.shape, dtype=dtype)
