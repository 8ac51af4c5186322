"""How a full (HF-order) tensor maps to tensor-parallel rank r of tp, per layout kind, with inverses.

This is the only module that knows the Megatron TP layouts:
- replicated: norms; every rank holds the whole tensor.
- column:     split dim 0 (rows)                 merge: cat dim 0
- row:        split dim 1 (columns)              merge: cat dim 1  (linear_proj, linear_fc2)
- vocab:      pad dim 0 to `padded`, then column (embedding, output layer)
- qkv:        per query group [q heads of the group; k; v], groups split over ranks
- fc1:        per rank [gate_r; up_r]
- ownership:  every split dimension (query groups, FFN channels, padded vocab rows) is cut into tp equal
              contiguous blocks and rank r owns block r; the index functions at the end map kept global
              indices (pruning) to rows / columns of a rank's shard.

Split functions take "sliceable" inputs (a torch.Tensor or checkpoint.hf_io.LazyTensor: `.shape` and basic
slicing) so the converter reads only the rows a rank needs. Merge functions accept uneven shards (as left by
global-mode pruning): sizes are read from the shards themselves.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch
from megatron_prune.errors import InputError


class Sliceable(Protocol):
    shape: Sequence[int]

    def __getitem__(self, idx) -> torch.Tensor: ...


def _even(n: int, tp: int, what: str) -> int:
    if n % tp:
        raise InputError(f"{what} {n} not divisible by TP {tp}")
    return n // tp


def _own(t: torch.Tensor) -> torch.Tensor:
    """A compact copy: torch.save of a view would write the whole underlying storage."""
    return t.clone() if t._base is not None or not t.is_contiguous() else t


# ----------------------------------------------------------------------------- column / row / replicated
def split_column(full: Sliceable, tp: int, rank: int) -> torch.Tensor:
    n = _even(full.shape[0], tp, "rows")
    return _own(full[rank * n:(rank + 1) * n])


def merge_column(shards: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat(list(shards), dim=0)


def split_row(full: Sliceable, tp: int, rank: int) -> torch.Tensor:
    n = _even(full.shape[1], tp, "columns")
    return _own(full[:, rank * n:(rank + 1) * n])


def merge_row(shards: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat(list(shards), dim=1)


def split_replicated(full: Sliceable, tp: int, rank: int) -> torch.Tensor:
    return _own(full[:])


def merge_replicated(shards: Sequence[torch.Tensor]) -> torch.Tensor:
    first = shards[0]
    for i, s in enumerate(shards[1:], start=1):
        if s.shape != first.shape or not torch.equal(s, first):
            raise InputError(f"replicated tensor differs between TP rank 0 and rank {i}")
    return first


# ----------------------------------------------------------------------------- vocab (padded)
def split_vocab(full: Sliceable, tp: int, rank: int, padded: int) -> torch.Tensor:
    """Rows [r*P/tp, (r+1)*P/tp) of the zero-padded [P, hidden] table; P = padded vocab size."""
    true_vocab = full.shape[0]
    if padded < true_vocab:
        raise InputError(f"padded vocab {padded} smaller than true vocab {true_vocab}")
    n = _even(padded, tp, "padded vocab")
    lo, hi = rank * n, (rank + 1) * n
    real = full[lo:min(hi, true_vocab)] if lo < true_vocab else None
    out = torch.zeros((n, *full.shape[1:]), dtype=_dtype_of(full, real))
    if real is not None:
        out[: real.shape[0]] = real
    return out


def merge_vocab(shards: Sequence[torch.Tensor], true_vocab: int) -> torch.Tensor:
    """Inverse of split_vocab: concatenate and drop the padding rows."""
    full = torch.cat(list(shards), dim=0)
    if full.shape[0] < true_vocab:
        raise InputError(f"vocab shards hold {full.shape[0]} rows, fewer than the true vocab {true_vocab}")
    return full[:true_vocab]  # a contiguous prefix view: no copy needed


def _dtype_of(full: Sliceable, sample: torch.Tensor | None) -> torch.dtype:
    if sample is not None:
        return sample.dtype
    return getattr(full, "dtype", torch.float32)


# ----------------------------------------------------------------------------- qkv per query group
def split_qkv(q: Sliceable, k: Sliceable, v: Sliceable, tp: int, rank: int, num_query_groups: int,
              kv_channels: int) -> torch.Tensor:
    """[groups_r * (heads_per_group + 2) * kv_channels, hidden]: for each local group its q heads, then k, then v."""
    d, g = kv_channels, num_query_groups
    gpr = _even(g, tp, "query groups")
    hpg = q.shape[0] // (g * d)
    if hpg * g * d != q.shape[0] or k.shape[0] != g * d or v.shape[0] != g * d:
        raise InputError(f"q/k/v rows {q.shape[0]}/{k.shape[0]}/{v.shape[0]} do not match "
                         f"groups={g}, kv_channels={d}")
    g0, g1 = rank * gpr, (rank + 1) * gpr
    hidden = q.shape[1]
    qs = q[g0 * hpg * d:g1 * hpg * d].reshape(gpr, hpg * d, hidden)
    ks = k[g0 * d:g1 * d].reshape(gpr, d, hidden)
    vs = v[g0 * d:g1 * d].reshape(gpr, d, hidden)
    return torch.cat([qs, ks, vs], dim=1).reshape(-1, hidden)


def merge_qkv(shards: Sequence[torch.Tensor], heads_per_group: int, kv_channels: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of split_qkv over all ranks; shards may hold different numbers of groups."""
    d, hpg = kv_channels, heads_per_group
    qs, ks, vs = [], [], []
    for s in shards:
        per_group = s.reshape(-1, (hpg + 2) * d, s.shape[-1])
        q, k, v = per_group.split([hpg * d, d, d], dim=1)
        qs.append(q.reshape(-1, s.shape[-1]))
        ks.append(k.reshape(-1, s.shape[-1]))
        vs.append(v.reshape(-1, s.shape[-1]))
    return torch.cat(qs), torch.cat(ks), torch.cat(vs)


# ----------------------------------------------------------------------------- fc1 [gate_r; up_r]
def split_fc1(gate: Sliceable, up: Sliceable, tp: int, rank: int) -> torch.Tensor:
    n = _even(gate.shape[0], tp, "ffn_hidden_size")
    return torch.cat([gate[rank * n:(rank + 1) * n], up[rank * n:(rank + 1) * n]], dim=0)


def merge_fc1(shards: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    gates, ups = zip(*(s.chunk(2, dim=0) for s in shards))
    return torch.cat(gates), torch.cat(ups)


# ----------------------------------------------------------------------------- a TP rank's blocks of the TP=1 tensor
def shard_blocks(kind: str, dims: Sequence[int], tp: int, rank: int) -> tuple[int, list[range]]:
    """(dim, blocks): the rows (dim 0) or columns (dim 1) of the TP=1 Megatron tensor of `dims` (qkv grouped, fc1
    [gate; up], vocab padded) that TP rank `rank` of `tp` holds; its shard is their concatenation in this order (what
    the split functions make from the HF tensors). megatron-core's torch_dist global tensors are these TP=1 tensors."""
    if kind == "replicated":
        return 0, [range(dims[0])]
    if kind == "row":
        return 1, [rank_range(dims[1], tp, rank)]
    if kind == "fc1":
        half = _even(dims[0], 2, "fc1 rows [gate; up]")
        gate = rank_range(half, tp, rank)
        return 0, [gate, range(half + gate.start, half + gate.stop)]
    return 0, [rank_range(dims[0], tp, rank)]  # column, vocab, qkv (a rank's query groups are contiguous rows)


def split_dim(kind: str) -> int:
    """The dimension a layout kind splits over TP ranks (replicated: none; 0 by convention)."""
    return 1 if kind == "row" else 0


# ----------------------------------------------------------------------------- ownership: rank r owns block r
def block_range(size: int, rank: int) -> range:
    """Global indices held by `rank` when every rank holds `size` consecutive ones (e.g. a vocab logit slice)."""
    return range(rank * size, (rank + 1) * size)


def rank_range(n: int, tp: int, rank: int) -> range:
    """Global indices of n units (query groups, FFN channels, padded vocab rows) owned by TP rank `rank` of tp."""
    return block_range(_even(n, tp, "size"), rank)


def kept_per_rank(kept: Sequence[int], n: int, tp: int) -> list[int]:
    """How many of the kept global indices (of n units) fall on each TP rank."""
    per = _even(n, tp, "size")
    counts = [0] * tp
    for i in kept:
        counts[i // per] += 1
    return counts


def local_indices(kept: Sequence[int], n: int, tp: int, rank: int) -> list[int]:
    """Positions inside rank `rank`'s block of the kept global indices (of n units) that fall in it."""
    own = rank_range(n, tp, rank)
    return [k - own.start for k in kept if k in own]


def vocab_keep_mask(v_local: int, tp_rank: int, true_vocab: int, device=None) -> torch.Tensor:
    """True for the real (unpadded) vocabulary entries of TP rank `tp_rank`'s slice of v_local rows/logits."""
    own = block_range(v_local, tp_rank)
    return torch.arange(own.start, own.stop, device=device) < true_vocab


# ----------------------------------------------------------------------------- kept units -> shard rows / columns
def _kept_local_groups(groups: Sequence[int], heads: Sequence[Sequence[int]], num_query_groups: int, tp: int,
                       rank: int) -> list[tuple[int, Sequence[int]]]:
    """(local group position, kept heads) of the kept groups rank `rank` owns, in global group order."""
    own = rank_range(num_query_groups, tp, rank)
    return [(g - own.start, h) for g, h in zip(groups, heads) if g in own]


def qkv_shard_rows(groups: Sequence[int], heads: Sequence[Sequence[int]], heads_per_group: int, kv_channels: int,
                   num_query_groups: int, tp: int, rank: int) -> list[int]:
    """Rows of rank `rank`'s linear_qkv shard (split_qkv's layout) that hold the kept units: per kept local group,
    its kept q heads (`heads[j]`: head numbers 0..heads_per_group-1 of `groups[j]`), then its k, then its v."""
    d, hpg = kv_channels, heads_per_group
    rows: list[int] = []
    for local, kept in _kept_local_groups(groups, heads, num_query_groups, tp, rank):
        base = local * (hpg + 2) * d
        for slot in (*kept, hpg, hpg + 1):  # kept q heads, then k, then v
            rows.extend(range(base + slot * d, base + (slot + 1) * d))
    return rows


def proj_shard_cols(groups: Sequence[int], heads: Sequence[Sequence[int]], heads_per_group: int, kv_channels: int,
                    num_query_groups: int, tp: int, rank: int) -> list[int]:
    """Columns of rank `rank`'s linear_proj shard (its local heads in (group, head) order) of the kept heads."""
    d, hpg = kv_channels, heads_per_group
    cols: list[int] = []
    for local, kept in _kept_local_groups(groups, heads, num_query_groups, tp, rank):
        for h in kept:
            head = local * hpg + h
            cols.extend(range(head * d, (head + 1) * d))
    return cols


def fc1_shard_rows(kept: Sequence[int], ffn_hidden_size: int, tp: int, rank: int) -> list[int]:
    """Rows of rank `rank`'s linear_fc1 shard ([gate_r; up_r]) of the kept FFN channels: gate rows, then up rows."""
    local = local_indices(kept, ffn_hidden_size, tp, rank)
    per = ffn_hidden_size // tp
    return local + [per + i for i in local]


def hf_head_rows(groups: Sequence[int], heads: Sequence[Sequence[int]], heads_per_group: int, kv_channels: int
                 ) -> list[int]:
    """Rows of HF q_proj (= columns of o_proj) of the kept heads, in (group, head) order: HF numbers query head
    j of group g as g * heads_per_group + j."""
    d, hpg = kv_channels, heads_per_group
    return [r for g, kept in zip(groups, heads) for h in kept for r in range((g * hpg + h) * d, (g * hpg + h + 1) * d)]


def hf_group_rows(groups: Sequence[int], kv_channels: int) -> list[int]:
    """Rows of HF k_proj / v_proj of the kept query groups."""
    d = kv_channels
    return [r for g in groups for r in range(g * d, (g + 1) * d)]
