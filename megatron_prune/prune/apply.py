"""Apply a PrunePlan to one TP rank's Megatron shard: pure (state dict in, state dict out), PP=1.

A plan is in global indices of the source model; rank r holds groups [r*G/tp, (r+1)*G/tp) and FFN channels
[r*F/tp, (r+1)*F/tp), so it keeps whatever kept indices fall there (equal counts in balance mode, any counts in
global mode). Hidden channels are not split over TP: every rank slices the same hidden columns/rows.

Local layouts (checkpoint.layout): linear_qkv rows are, per local group, [q heads of the group; k; v] (each
kv_channels rows); linear_proj columns are the local heads in (group, head) order; linear_fc1 rows are
[gate_r; up_r]; linear_fc2 columns are the local FFN channels.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from megatron_prune.checkpoint import megatron_io as mio
from megatron_prune.checkpoint.keys import (EMBEDDING, FINAL_NORM, LAYER_EXTRA_STATE, OUTPUT, OUTPUT_EXTRA_STATE,
                                            to_local_names, to_te_names)
from megatron_prune.config.shape import LlamaShape
from megatron_prune.prune.plan import STRUCTURE, LayerPlan, PlanError, PrunePlan

Release = Callable[[torch.Tensor], None]
_L = "decoder.layers.{}."


def local_positions(kept: Sequence[int], total: int, tp: int, rank: int) -> list[int]:
    """Positions inside rank `rank`'s contiguous partition of the kept global indices that fall in it."""
    per = total // tp
    lo = rank * per
    return [k - lo for k in kept if lo <= k < lo + per]


def _index(idx: Sequence[int]) -> torch.Tensor:
    return torch.as_tensor(list(idx), dtype=torch.long)


def qkv_rows(lp: LayerPlan, src: LlamaShape, tp: int, rank: int) -> torch.Tensor:
    d, hpg, gpr = src.kv_channels, src.heads_per_group, src.num_query_groups // tp
    rows: list[int] = []
    for g, heads in zip(lp.groups, lp.heads):
        if not rank * gpr <= g < (rank + 1) * gpr:
            continue
        base = (g - rank * gpr) * (hpg + 2) * d
        for slot in (*heads, hpg, hpg + 1):  # kept q heads, then k, then v
            rows.extend(range(base + slot * d, base + (slot + 1) * d))
    return _index(rows)


def proj_cols(lp: LayerPlan, src: LlamaShape, tp: int, rank: int) -> torch.Tensor:
    d, hpg, gpr = src.kv_channels, src.heads_per_group, src.num_query_groups // tp
    cols: list[int] = []
    for g, heads in zip(lp.groups, lp.heads):
        if rank * gpr <= g < (rank + 1) * gpr:
            for h in heads:
                head = (g - rank * gpr) * hpg + h
                cols.extend(range(head * d, (head + 1) * d))
    return _index(cols)


def fc1_rows(lp: LayerPlan, src: LlamaShape, tp: int, rank: int) -> torch.Tensor:
    local = local_positions(lp.ffn, src.ffn_hidden_size, tp, rank)
    per = src.ffn_hidden_size // tp
    return _index(local + [per + i for i in local])  # gate_r then up_r


def take(t: torch.Tensor, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> torch.Tensor:
    """t[rows][:, cols] as a compact new tensor; None keeps the dimension whole. Rows first: the smaller copy."""
    out = t
    if rows is not None and not _is_all(rows, t.shape[0]):
        out = out.index_select(0, rows)
    if cols is not None and not _is_all(cols, t.shape[1]):
        out = out.index_select(1, cols)
    return out.clone() if out is t else out  # never hand back the (mmap'd) input itself


def _is_all(idx: torch.Tensor, n: int) -> bool:
    return idx.numel() == n and bool((idx == torch.arange(n)).all())


def expected_keys(src: LlamaShape) -> list[str]:
    keys = [EMBEDDING.mcore]
    for i in range(src.num_layers):
        keys += [_L.format(i) + s for s in _LAYER_SUFFIXES] + [t.format(i) for t in LAYER_EXTRA_STATE]
    keys.append(FINAL_NORM.mcore)
    if not src.tie_word_embeddings:
        keys.append(OUTPUT.mcore)
    return keys + [OUTPUT_EXTRA_STATE]


_LAYER_SUFFIXES = ("input_layernorm.weight", "self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
                   "pre_mlp_layernorm.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight")


def check_shard_keys(sd: dict, src: LlamaShape) -> None:
    want = expected_keys(src)
    missing = [k for k in want if k not in sd and not k.endswith("_extra_state")]
    extra = [k for k in sd if k not in set(want)]
    if missing or extra:
        raise PlanError(f"shard does not match the plan's source shape ({src.num_layers} layers): "
                        f"missing {missing[:4]}, unexpected {extra[:4]}")


def apply_rank(sd: dict, plan: PrunePlan, tp: int, tp_rank: int, te_names: bool = False,
               release: Release | None = None) -> dict:
    """The pruned state dict of TP rank `tp_rank` (of `tp`) from its source shard `sd` (local or TE names).

    `release(t)` is called with each source tensor once it has been read (lets the caller drop mmap'd pages)."""
    src = plan.source
    sd = to_local_names(sd)
    check_shard_keys(sd, src)
    hidden = _index(plan.hidden)
    done = release or (lambda t: None)

    def get(key: str, rows=None, cols=None) -> torch.Tensor:
        t = sd[key]
        out = take(t, rows, cols)
        done(t)
        return out

    out: dict = {EMBEDDING.mcore: get(EMBEDDING.mcore, cols=hidden)}
    for new, lp in enumerate(plan.layers):
        out.update(_layer(get, sd, lp, new, src, tp, tp_rank, hidden))
    out[FINAL_NORM.mcore] = get(FINAL_NORM.mcore, rows=hidden)
    if not src.tie_word_embeddings:
        out[OUTPUT.mcore] = get(OUTPUT.mcore, cols=hidden)
    out[OUTPUT_EXTRA_STATE] = sd.get(OUTPUT_EXTRA_STATE)
    return to_te_names(out) if te_names else out


def _layer(get, sd: dict, lp: LayerPlan, new: int, src: LlamaShape, tp: int, rank: int, hidden: torch.Tensor
           ) -> dict:
    a, b = _L.format(lp.source), _L.format(new)
    ffn = _index(local_positions(lp.ffn, src.ffn_hidden_size, tp, rank))
    out = {
        b + "input_layernorm.weight": get(a + "input_layernorm.weight", rows=hidden),
        b + "self_attention.linear_qkv.weight": get(a + "self_attention.linear_qkv.weight",
                                                    rows=qkv_rows(lp, src, tp, rank), cols=hidden),
        b + "self_attention.linear_proj.weight": get(a + "self_attention.linear_proj.weight", rows=hidden,
                                                     cols=proj_cols(lp, src, tp, rank)),
        b + "pre_mlp_layernorm.weight": get(a + "pre_mlp_layernorm.weight", rows=hidden),
        b + "mlp.linear_fc1.weight": get(a + "mlp.linear_fc1.weight", rows=fc1_rows(lp, src, tp, rank), cols=hidden),
        b + "mlp.linear_fc2.weight": get(a + "mlp.linear_fc2.weight", rows=hidden, cols=ffn),
    }
    for t in LAYER_EXTRA_STATE:
        out[t.format(new)] = sd.get(t.format(lp.source))
    return out


# ----------------------------------------------------------------------------- metadata of the pruned checkpoint
def rank_sizes(plan: PrunePlan, tp: int) -> dict | None:
    """Per-layer, per-rank kept groups and FFN channels when shards are uneven; None when every rank is equal."""
    return None if plan.is_balanced(tp) else plan.rank_counts(tp)


def target_shape(plan: PrunePlan, actual: LlamaShape) -> LlamaShape:
    """The plan's target sizes on the actual model's other fields (dtype, rope, eps, max positions)."""
    return actual.replace(**{f: getattr(plan.target, f) for f in STRUCTURE})


def pruned_meta(meta: mio.CheckpointMeta, plan: PrunePlan, **details) -> mio.CheckpointMeta:
    """Meta of the pruned checkpoint: target shape (source dtype), per-rank sizes, the plan appended to history."""
    plan.check_source(meta.shape)
    shape = target_shape(plan, meta.shape)
    return meta.replace(shape=shape, rank_sizes=rank_sizes(plan, meta.tp)).with_history(
        "prune", plan=plan.to_json(), plan_sha256=plan.fingerprint(), **details)
