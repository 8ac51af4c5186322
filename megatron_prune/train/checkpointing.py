"""Training checkpoints in Megatron-LM's legacy layout, so the exporter and resharder read training output.

    ROOT/iter_0000010/mp_rank_TT[_PPP]/model_optim_rng.pt   {"model", "args", "checkpoint_version", "iteration",
                                                              "optimizer", "opt_param_scheduler", "rng_state",
                                                              "consumed_train_samples"}
    ROOT/iter_0000010/mp_rank_TT[_PPP]/distrib_optim_dpDDD.pt  distributed optimizer only: DP rank DDD's shard of
                                                              main params + Adam state (megatron-core's
                                                              "dp_reshardable" bucket layout; resume needs the
                                                              same DP size)
    ROOT/megatron_prune.json, ROOT/latest_checkpointed_iteration.txt (written last)

Why per-DP-rank shards and not Megatron-LM's gathered `distrib_optim.pt`: megatron-core 0.16's dp-zero loader
cannot restore torch.optim.AdamW's per-parameter `step` (KeyError 'step'; measured without apex/TE), and the
per-rank layout needs no gather.

Save protocol: DP rank 0 of every (TP, PP) rank writes its files into the iteration directory (each file
atomically), barrier, then global rank 0 writes the iteration's own meta, the tracker, then the root meta (which
names its iteration), then prunes old iterations. A crash before the tracker leaves the previous checkpoint
current, described by its own meta; training in place (`--load X --save X`) works run after run.
"""

from __future__ import annotations

import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_prune.checkpoint import megatron_io as mio
from megatron_prune.checkpoint.hf_io import CheckpointError, copy_tokenizer_files
from megatron_prune.model.dist import DistInfo

DISTRIB_OPTIM_FILE = "distrib_optim_dp{:03d}.pt"
_ITER_DIR = re.compile(r"^iter_(\d{7})$")


@dataclass(frozen=True)
class Progress:
    """Where training stands: completed iterations and the data position (samples consumed)."""

    iteration: int = 0
    consumed_train_samples: int = 0


@dataclass(frozen=True)
class ResumePoint:
    root: Path
    iteration: int | str      # "release" for converted / pruned checkpoints
    meta: mio.CheckpointMeta

    @property
    def is_training_checkpoint(self) -> bool:
        return self.iteration != "release"


def find_resume_point(load: str, save: str | None) -> ResumePoint:
    """`save` if it already holds a checkpoint (restart after a stop or crash), else `load`."""
    for root in ([Path(save)] if save else []) + [Path(load)]:
        if (root / mio.TRACKER).is_file():
            return ResumePoint(root=root, iteration=mio.read_tracker(root), meta=mio.read_meta(root))
    raise mio.not_a_checkpoint(load)


# ---------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    from megatron.core.tensor_parallel import random as mp_random

    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "tracker": mp_random.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import random as mp_random

    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    mp_random.get_cuda_rng_tracker().set_states(state["tracker"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---------------------------------------------------------------------------------------------- save
def model_state_dict(model) -> dict[str, Any]:
    """The unwrapped model's tensors; `_extra_state` entries as None, exactly as the converter writes them."""
    module = getattr(model, "module", model)
    return {k: (None if k.endswith("_extra_state") else v.detach().clone())
            for k, v in module.state_dict().items()}


def _distributed_optimizers(optimizer) -> list:
    from megatron.core.optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o for o in inner if isinstance(o, DistributedOptimizer)]


def save_checkpoint(root: str | Path, progress: Progress, model, optimizer, scheduler,
                    meta: mio.CheckpointMeta, info: DistInfo, args_extra: dict[str, Any],
                    keep_last: int, tokenizer_src: Path | None = None) -> Path:
    """Write iteration `progress.iteration` on every rank; returns the iteration directory."""
    root = Path(root)
    it = progress.iteration
    dist_opts = _distributed_optimizers(optimizer)
    # Before its first applied step (e.g. only fp16 overflows so far) megatron's DistributedOptimizer cannot
    # produce a state dict; a fresh optimizer is then the exact state, so none is saved.
    stepped = all(len(o.optimizer.state) > 0 for o in dist_opts)
    if info.dp_rank == 0:
        args = mio.megatron_args(meta, consumed_train_samples=progress.consumed_train_samples,
                                 iteration=it, **args_extra)
        state = mio.rank_state(model_state_dict(model), args, it)
        state.update(optimizer=optimizer.state_dict() if stepped else None, opt_param_scheduler=scheduler.state_dict(),
                     rng_state=rng_state(), consumed_train_samples=progress.consumed_train_samples,
                     distributed_optimizer=bool(dist_opts))
        mio.save_rank(root, it, info.tp_rank, info.pp_rank, info.pp, state)
    if dist_opts and stepped:
        shards = [_detached(o.get_parameter_state_dp_reshardable()) for o in dist_opts]
        path = mio.rank_path(root, it, info.tp_rank, info.pp_rank, info.pp)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_torch_save(shards, path.with_name(DISTRIB_OPTIM_FILE.format(info.dp_rank)))
    dist.barrier()
    if info.rank == 0:
        _commit(root, it, meta, tokenizer_src)
        prune_old_checkpoints(root, keep_last)
    dist.barrier()
    return root / mio.iteration_dir_name(it)


def _commit(root: Path, it: int, meta: mio.CheckpointMeta, tokenizer_src: Path | None) -> None:
    """Rank 0, after every rank's files: the iteration's own meta, tokenizer, tracker, then the root meta.
    Until the tracker moves, readers see the previous iteration with its own meta (`pin_meta`); with
    `--load X --save X` the tokenizer is already in place (copying it onto itself would fail)."""
    mio.pin_meta(root)
    mio.write_meta(root / mio.iteration_dir_name(it), meta, iteration=it)
    if tokenizer_src is not None and not _same_dir(tokenizer_src, root):
        copy_tokenizer_files(tokenizer_src, root)
    mio.write_tracker(root, it)
    mio.write_meta(root, meta, iteration=it)


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return Path(a).samefile(b)
    except OSError:
        return False


def _detached(obj: Any) -> Any:
    """Copies of the tensors (shards are views of whole buffers, which torch.save would write entirely), and
    the `padding` flag megatron-core's loader expects on every parameter entry."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        out = {k: _detached(v) for k, v in obj.items()}
        if "gbuf_local_start" in out:
            out.setdefault("padding", False)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detached(v) for v in obj)
    return obj


def _atomic_torch_save(obj: Any, path: Path) -> None:
    """Partial files are removed on failure (a full disk stays usable); ENOSPC is one line."""
    from megatron_prune.checkpoint.atomic import atomic_file

    atomic_file(path, lambda tmp: torch.save(obj, tmp))


def prune_old_checkpoints(root: Path, keep_last: int) -> list[Path]:
    """Delete iteration directories beyond the `keep_last` newest (0 keeps all); never the tracked one."""
    if keep_last <= 0:
        return []
    current = mio.read_tracker(root)
    iters = sorted(int(m.group(1)) for d in root.iterdir() if (m := _ITER_DIR.match(d.name)) and d.is_dir())
    doomed = [i for i in iters[:-keep_last] if i != current]
    for i in doomed:
        shutil.rmtree(root / mio.iteration_dir_name(i), ignore_errors=True)
    return [root / mio.iteration_dir_name(i) for i in doomed]


# ---------------------------------------------------------------------------------------------- load
def load_rank_state(point: ResumePoint, info: DistInfo) -> dict[str, Any]:
    return mio.load_rank(point.root, info.tp_rank, info.pp_rank, point.meta, point.iteration)


def restore_training_state(point: ResumePoint, state: dict[str, Any], optimizer, scheduler,
                           info: DistInfo) -> Progress:
    """Optimizer, scheduler, RNG and data position from a training checkpoint's rank file (after the
    model weights were loaded and the optimizer built)."""
    missing = [k for k in ("optimizer", "opt_param_scheduler", "rng_state") if k not in state]
    if missing:
        raise CheckpointError(f"{point.root}: iteration {point.iteration} lacks {', '.join(missing)} "
                              f"(not written by training?); pass --finetune to take only its weights")
    if state["optimizer"] is not None:  # None: saved before any applied step, the fresh optimizer is exact
        _restore_optimizer(point, state, optimizer, info)
    scheduler.load_state_dict(state["opt_param_scheduler"])
    set_rng_state(state["rng_state"])
    return Progress(iteration=int(point.iteration),
                    consumed_train_samples=int(state.get("consumed_train_samples", 0)))


def check_optimizer_files(point: ResumePoint, state: dict[str, Any], info: DistInfo,
                          use_distributed_optimizer: bool) -> None:
    """Before any rank restores optimizer state: the saved kind matches, and with the distributed optimizer the
    shards match this job's data-parallel size (megatron-core would fail with a bare AssertionError, and only
    on some ranks)."""
    if state.get("optimizer") is None:  # saved before any applied step: nothing to restore
        return
    saved_dist = bool(state.get("distributed_optimizer", False))
    if saved_dist != use_distributed_optimizer:
        raise CheckpointError(f"{point.root}: iteration {point.iteration} was saved "
                              f"{'with' if saved_dist else 'without'} --use-distributed-optimizer; resume the "
                              f"same way (or pass --finetune for a fresh optimizer)")
    if not saved_dist:
        return
    rank_dir = mio.rank_path(point.root, point.iteration, info.tp_rank, info.pp_rank, info.pp).parent
    saved_dp = len(list(rank_dir.glob(DISTRIB_OPTIM_FILE.replace("{:03d}", "*"))))
    own = rank_dir / DISTRIB_OPTIM_FILE.format(info.dp_rank)
    if saved_dp != info.dp:
        raise CheckpointError(f"{rank_dir}: distributed-optimizer state was saved by {saved_dp} data-parallel "
                              f"ranks, this job has {info.dp}; resume with data-parallel size {saved_dp} (or pass "
                              f"--finetune for a fresh optimizer)")
    if not own.is_file():
        raise CheckpointError(f"{own}: missing distributed-optimizer shard of DP rank {info.dp_rank} "
                              f"(resume with the data-parallel size of the run that saved it)")


def _restore_optimizer(point: ResumePoint, state: dict[str, Any], optimizer, info: DistInfo) -> None:
    dist_opts = _distributed_optimizers(optimizer)
    saved_dist = bool(state.get("distributed_optimizer", False))
    if saved_dist != bool(dist_opts):
        raise CheckpointError(f"{point.root}: iteration {point.iteration} was saved "
                              f"{'with' if saved_dist else 'without'} --use-distributed-optimizer; resume the "
                              f"same way (or pass --finetune for a fresh optimizer)")
    optimizer.load_state_dict(state["optimizer"])
    _unshare_adam_steps(dist_opts)
    if not dist_opts:
        return
    path = mio.rank_path(point.root, point.iteration, info.tp_rank, info.pp_rank, info.pp)
    shard_path = path.with_name(DISTRIB_OPTIM_FILE.format(info.dp_rank))
    if not shard_path.is_file():
        raise CheckpointError(f"{shard_path}: missing distributed-optimizer shard of DP rank {info.dp_rank} "
                              f"(resume with the data-parallel size of the run that saved it)")
    with torch.no_grad():  # copies into main params that require grad
        for opt, shard in zip(dist_opts, _load_shards(shard_path)):
            opt.load_parameter_state_from_dp_reshardable(shard)


def _unshare_adam_steps(dist_opts: list) -> None:
    """megatron-core 0.16's DistributedOptimizer.load_state_dict gives every parameter of a torch AdamW (the
    optimizer used without apex/TE) the *same* `step` tensor; AdamW increments it in place once per parameter,
    which corrupts bias correction after a resume (measured). Give each parameter its own copy."""
    for opt in dist_opts:
        for st in opt.optimizer.state.values():
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].clone()


def _load_shards(path: Path) -> list:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot load ({type(e).__name__}: {e})") from None
