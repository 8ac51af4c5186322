"""Apply a PrunePlan to one TP rank's Megatron shard: pure (state dict in, state dict out), PP=1.

A plan is in global indices of the source model; each rank keeps whatever kept groups / FFN channels fall in
the block it owns (checkpoint.layout: rank r owns block r; equal counts in balance mode, any counts in global
mode). Hidden channels are not split over TP: every rank slices the same hidden columns/rows. Which rows and
columns of a shard hold the kept units (qkv interleave, fc1 [gate_r; up_r], proj heads) is checkpoint.layout's
knowledge; this module only pairs it with the plan and the key names (checkpoint.keys).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from megatron_prune.checkpoint import layout
from megatron_prune.checkpoint import megatron_io as mio
from megatron_prune.checkpoint.keys import (EMBEDDING, FC1, FC2, FINAL_NORM, INPUT_NORM, LAYER_EXTRA_STATE,
                                            LAYER_MAPS, OUTPUT, OUTPUT_EXTRA_STATE, PRE_MLP_NORM, PROJ, QKV,
                                            to_local_names, to_te_names)
from megatron_prune.config.shape import LlamaShape
from megatron_prune.prune.plan import STRUCTURE, LayerPlan, PlanError, PrunePlan

Release = Callable[[torch.Tensor], None]


def _index(idx: Sequence[int]) -> torch.Tensor:
    return torch.as_tensor(list(idx), dtype=torch.long)


def take(t: torch.Tensor, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> torch.Tensor:
    """t[rows][:, cols] as a compact new tensor; None keeps the dimension whole. Rows first: the smaller copy."""
    out = t
    if rows is not None and not _is_all(rows, t.shape[0]):
        out = out.index_select(0, rows.to(t.device))  # (the search slices a loaded model's CUDA parameters)
    if cols is not None and not _is_all(cols, t.shape[1]):
        out = out.index_select(1, cols.to(t.device))
    return out.clone() if out is t else out  # never hand back the (mmap'd) input itself


def _is_all(idx: torch.Tensor, n: int) -> bool:
    return idx.numel() == n and bool((idx == torch.arange(n)).all())


def expected_keys(src: LlamaShape) -> list[str]:
    keys = [EMBEDDING.mcore]
    for i in range(src.num_layers):
        keys += [m.mcore.format(i) for m in LAYER_MAPS] + [t.format(i) for t in LAYER_EXTRA_STATE]
    keys.append(FINAL_NORM.mcore)
    if not src.tie_word_embeddings:
        keys.append(OUTPUT.mcore)
    return keys + [OUTPUT_EXTRA_STATE]


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
    a, b = lp.source, new
    heads = (lp.groups, lp.heads, src.heads_per_group, src.kv_channels, src.num_query_groups, tp, rank)
    qkv, proj = _index(layout.qkv_shard_rows(*heads)), _index(layout.proj_shard_cols(*heads))
    fc1 = _index(layout.fc1_shard_rows(lp.ffn, src.ffn_hidden_size, tp, rank))
    ffn = _index(layout.local_indices(lp.ffn, src.ffn_hidden_size, tp, rank))
    out = {
        INPUT_NORM.mcore.format(b): get(INPUT_NORM.mcore.format(a), rows=hidden),
        QKV.mcore.format(b): get(QKV.mcore.format(a), rows=qkv, cols=hidden),
        PROJ.mcore.format(b): get(PROJ.mcore.format(a), rows=hidden, cols=proj),
        PRE_MLP_NORM.mcore.format(b): get(PRE_MLP_NORM.mcore.format(a), rows=hidden),
        FC1.mcore.format(b): get(FC1.mcore.format(a), rows=fc1, cols=hidden),
        FC2.mcore.format(b): get(FC2.mcore.format(a), rows=hidden, cols=ffn),
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
