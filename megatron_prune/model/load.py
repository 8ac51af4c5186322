"""Build this rank's GPTModel for a Megatron checkpoint and load its shard (strict)."""

from __future__ import annotations

from pathlib import Path

from megatron_prune.checkpoint import megatron_io as mio
from megatron_prune.checkpoint.errors import CheckpointError
from megatron_prune.model.build import ModelOptions, build_model, load_shard
from megatron_prune.model.dist import DistInfo


def model_options(meta: mio.CheckpointMeta, **overrides) -> ModelOptions:
    return ModelOptions(tp=meta.tp, pp=meta.pp, padded_vocab_size=meta.padded_vocab_size, **overrides)


def check_loadable(meta: mio.CheckpointMeta, info: DistInfo, root: Path) -> None:
    if meta.rank_sizes:
        raise CheckpointError(f"{root}: shards are uneven (global-mode pruning); megatron-core needs equal shards: "
                              f"run `python -m megatron_prune reshard` first")
    if (info.tp, info.pp) != (meta.tp, meta.pp):
        raise CheckpointError(f"{root}: checkpoint is tp={meta.tp}, pp={meta.pp} but the job runs tp={info.tp}, "
                              f"pp={info.pp}: run with --tp {meta.tp} --pp {meta.pp}, or reshard it "
                              f"(`reshard --tp {info.tp} --pp {info.pp}`)")


def load_model(root: str | Path, info: DistInfo, **opts):
    """(model, meta) for this process's (tp_rank, pp_rank), weights loaded from `root` (a torch_dist checkpoint at
    the job's TP/PP, whatever it was written with)."""
    root = Path(root)
    ck = mio.open_checkpoint(root, info.tp, info.pp)
    meta = ck.meta
    check_loadable(meta, info, root)
    model = build_model(meta.shape, model_options(meta, **opts))
    state = ck.load_rank(info.tp_rank, info.pp_rank)
    load_shard(model, state["model"], use_te=opts.get("use_te", False))
    return model, meta
