"""The distributed pruner: one process per TP rank (torchrun), PP=1.

    check(cfg)             every user error, in one process, before any work (the CLI's --check-only): the
                           checkpoint, the target / plan / budget, the calibration windows, the output
    search_shapes(...)     `--target-params` / `--target-memory-gb`: the search space of a budget, in one process
    prune_checkpoint(cfg)  on every rank: load the shard (mmap), make or read the plan (scoring.plan_for, or the
                           budget search: search_run), check that every rank holds the same plan, apply it, write
                           (model.dist_write: each rank its file into a temp dir, rank 0 plan + meta + tracker
                           last, then rename)
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_prune.checkpoint import megatron_io as mio
from megatron_prune.checkpoint.atomic import atomic_write_text, check_free_space, check_output_dir
from megatron_prune.checkpoint.consistency import NonFiniteError, describe_non_finite, is_finite
from megatron_prune.checkpoint.dist_files import save_dist_shard
from megatron_prune.checkpoint.errors import CheckpointError
from megatron_prune.checkpoint.hf_io import copy_tokenizer_files
from megatron_prune.config.shape import DTYPE_BYTES, LlamaShape
from megatron_prune.errors import InputError
from megatron_prune.model.agree import agree, check_identical
from megatron_prune.model.dist import init_process_group
from megatron_prune.model.dist_write import PageDropper, write_distributed
from megatron_prune.prune.apply import apply_rank, pruned_meta, target_shape
from megatron_prune.prune.calib import Calibration, read_calibration
from megatron_prune.prune.config import PruneConfig, SearchConfig
from megatron_prune.prune.plan import PlanError, PrunePlan
from megatron_prune.prune.scoring import MODEL_METHODS, plan_for, scoring_model
from megatron_prune.prune.search_run import (SEARCH_FILE, SearchReport, check_search_importance, find_candidates,
                                             search_plan, search_windows)
from megatron_prune.prune.search_space import Space

PLAN_FILE = "prune_plan.json"


@dataclass(frozen=True)
class Prepared:
    meta: mio.CheckpointMeta
    iteration: int | str
    target: LlamaShape
    plan: PrunePlan | None
    space: Space | None = None               # the budget search's shapes (cfg.search)
    calibration: Calibration | None = None   # the scoring windows (activation / taylor, or any budget search)
    held_out: Calibration | None = None      # the budget search's held-out windows


@dataclass(frozen=True)
class PruneResult:
    plan: PrunePlan
    meta: mio.CheckpointMeta
    seconds: dict
    peak_rss: list[int]   # bytes, per TP rank
    search: SearchReport | None = None


def check_input(load: str | Path, tp: int | None = None) -> tuple[mio.CheckpointMeta, int | str]:
    """(meta, iteration) of a checkpoint the pruner can read: complete rank files, PP=1, even shards (a torch_dist
    checkpoint is read at `tp`, default the size it was written with, and PP=1)."""
    load = Path(load)
    ck = mio.open_checkpoint(load, tp=tp, pp=1 if mio.checkpoint_format(load) == "torch_dist" else None)
    meta, iteration = ck.meta, ck.iteration
    if meta.pp != 1:
        raise CheckpointError(f"{load}: pp={meta.pp}; the pruner needs PP=1: reshard to PP=1 first "
                              f"(python -m megatron_prune reshard --load {load} --pp 1 --tp {meta.tp} ...)")
    if meta.rank_sizes:
        raise CheckpointError(f"{load}: shards are uneven (global-mode pruning); reshard it before pruning again")
    return meta, iteration


def search_shapes(load: str | Path, search: SearchConfig, tp: int | None = None
                  ) -> tuple[mio.CheckpointMeta, Space]:
    """(meta, search space) of a budget (the KV cache's seq_length defaults to the model's
    max_position_embeddings), single process, no tensors read: the CLI's --dry-run."""
    meta, _ = check_input(load, tp)
    return meta, find_candidates(meta.shape, meta.tp, load, search)


def check(cfg: PruneConfig, tp: int | None = None) -> Prepared:
    """Validate checkpoint, target or plan, calibration data and output directory; no weights are read. `tp`: the
    job's TP size (a torch_dist checkpoint is read at it)."""
    meta, iteration = check_input(cfg.load, tp)
    check_output_dir(cfg.save, cfg.overwrite, inputs=cfg.inputs())
    plan, space, calibration, held_out = None, None, None, None
    if cfg.plan:
        plan = PrunePlan.load(cfg.plan)
        plan.check_source(meta.shape)
        plan.check_tp(meta.tp, cfg.mode)
        target = target_shape(plan, meta.shape)
    elif cfg.search:
        space = find_candidates(meta.shape, meta.tp, Path(cfg.load), cfg.search)
        target = max(space.shapes, key=lambda c: c.params).shape  # free space for any
        check_search_importance(cfg.importance, meta.shape, space.shapes)
        calibration, held_out = search_windows(cfg, meta.shape.vocab_size)
    else:
        target = cfg.target.resolve(meta.shape, meta.tp)
        if target.num_layers < meta.shape.num_layers and not cfg.target.drop_layers \
                and cfg.importance == "magnitude":
            raise PlanError("choosing layers to drop needs Block Influence (--importance activation or taylor) "
                            "or --drop-layers; magnitude importance has no layer scores")
        if cfg.importance in MODEL_METHODS:
            calibration = read_calibration(cfg.calib, cfg.load, meta.shape.vocab_size, cfg.calib.samples)
    check_free_space(Path(cfg.save).parent, target.num_params() * DTYPE_BYTES[target.dtype], cfg.save)
    return Prepared(meta=meta, iteration=iteration, target=target, plan=plan, space=space,
                    calibration=calibration, held_out=held_out)


def plan_from_target(cfg: PruneConfig, prep: Prepared, shard: dict) -> PrunePlan:
    """The plan of hand-given sizes (cfg.target), scored by cfg.importance; `shard`: this rank's source tensors."""
    meta, c = prep.meta, cfg.calib
    with scoring_model(cfg.importance, cfg.load, meta.tp, c.seq_length, cfg.seed) as model:
        plan, = plan_for(cfg.importance, meta.shape, [cfg.target], meta.tp, cfg.seed, shard=shard, model=model,
                         calib=prep.calibration, micro_batch_size=c.micro_batch_size,
                         progress=cfg.progress and dist.get_rank() == 0)
    return plan


# ----------------------------------------------------------------------------- the whole run, on every rank
def prune_checkpoint(cfg: PruneConfig) -> PruneResult:
    init_process_group()
    world, rank = dist.get_world_size(), dist.get_rank()
    prep = agree(_check_job, cfg, world)  # every rank validates before the first collective; one report
    meta = prep.meta
    times = {}
    t0 = time.perf_counter() - (prep.calibration.seconds if prep.calibration else 0.0)  # read in the check
    report = None
    if cfg.search:  # before the shard is mapped below: the search holds its own loaded copy of it
        plan, report = search_plan(cfg, meta, prep.space, prep.calibration, prep.held_out)
    state = agree(mio.load_rank, cfg.load, rank, 0, meta, prep.iteration)  # this rank's own file (mmap)
    if not cfg.search:
        plan = prep.plan or plan_from_target(cfg, prep, state["model"])
    if prep.plan and cfg.mode:
        plan = plan.replace(mode=cfg.mode)
    check_identical(plan.fingerprint(), "plans")  # every rank must apply the same plan
    times["plan"] = time.perf_counter() - t0
    source = mio.rank_path(Path(cfg.load), prep.iteration, rank, 0, 1)
    sd = apply_rank(state["model"], plan, meta.tp, rank, meta.te_names, release=PageDropper(source))
    del state
    new_meta = pruned_meta(meta, plan, source=str(Path(cfg.load).resolve()), tp=meta.tp)
    times["apply"] = time.perf_counter() - t0 - times["plan"]
    args = mio.megatron_args(new_meta, ckpt_format=cfg.ckpt_format)
    if cfg.ckpt_format == "torch_dist":  # a collective save: every rank's checks agreed on before it
        agree(_check_dist_output, cfg, new_meta, source, sd)

    def write_rank(tmp: Path) -> None:
        if cfg.ckpt_format == "torch_dist":
            save_dist_shard(tmp, new_meta, sd, rank, 0, args)
            return
        if not cfg.allow_non_finite:
            check_finite_state(source, sd)
        mio.save_rank(tmp, "release", rank, 0, 1, mio.rank_state(sd, args, 0))

    write_distributed(cfg.save, write_rank, lambda tmp: _finalize(tmp, cfg, new_meta, plan, report),
                      overwrite=cfg.overwrite, inputs=cfg.inputs())
    times["total"] = time.perf_counter() - t0
    rss = [None] * world
    dist.all_gather_object(rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return PruneResult(plan=plan, meta=new_meta, seconds=times, peak_rss=rss, search=report)


def check_finite_state(source: Path, sd: dict) -> None:
    """Pruned tensors (in memory, just made) holding NaN / Inf: named with the source rank file."""
    for key, t in sd.items():
        if isinstance(t, torch.Tensor) and not is_finite(t):
            raise NonFiniteError(f"{source}: tensor {key!r} (after pruning) holds non-finite values "
                                 f"({describe_non_finite(t)}); pass --allow-non-finite to prune it anyway")


def _check_dist_output(cfg: PruneConfig, meta: mio.CheckpointMeta, source: Path, sd: dict) -> None:
    if meta.rank_sizes:
        raise InputError("uneven shards (global-mode pruning) cannot be saved as torch_dist (its tensors do not "
                         "depend on the TP size); prune with --ckpt-format torch, or without global mode")
    if not cfg.allow_non_finite:
        check_finite_state(source, sd)


def _check_job(cfg: PruneConfig, world: int) -> Prepared:
    prep = check(cfg, tp=world)
    if world != prep.meta.tp:
        raise InputError(f"the checkpoint has tp={prep.meta.tp}, but {world} processes run: launch one per TP "
                         f"rank (torchrun --nproc-per-node {prep.meta.tp})")
    return prep


def _finalize(tmp: Path, cfg: PruneConfig, meta: mio.CheckpointMeta, plan: PrunePlan,
              report: SearchReport | None = None) -> None:
    copy_tokenizer_files(Path(cfg.load), tmp)
    plan.save(tmp / PLAN_FILE)
    if report is not None:
        atomic_write_text(tmp / SEARCH_FILE, json.dumps(report.to_json(), indent=1) + "\n")
    mio.write_meta(tmp, meta)
    mio.write_tracker(tmp, "release")
