"""Training checkpoints in Megatron-LM's layouts (`--ckpt-format torch`, the default, or `torch_dist`), so the
exporter and resharder read training output and Megatron-LM continues it.

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

torch_dist (checkpoint.dist_ckpt): every rank saves its model and optimizer shards through megatron-core's
dist_checkpointing (the model's and the optimizer's own sharded_state_dict; the distributed optimizer in its
"fully_reshardable" form, Megatron-LM's --dist-ckpt-optim-fully-reshardable, which any DP and TP size reads:
resume at another data-parallel or TP size keeps the optimizer state), with Megatron-LM's common state (args,
iteration, opt_param_scheduler) and its rng_state object.

RNG state is saved in Megatron-LM's layout ([{random_rng_state, np_rng_state, torch_rng_state, cuda_rng_state,
rng_tracker_states}]; on a machine without CUDA there is no cuda_rng_state, and megatron-lm-args says so).

Save protocol: DP rank 0 of every (TP, PP) rank writes its files into the iteration directory (each file
atomically; torch_dist: all ranks into a temporary sibling, renamed by rank 0), barrier, then global rank 0 writes
the iteration's own meta, the tracker, then the root meta (which names its iteration), then prunes old
iterations. A crash before the tracker leaves the previous checkpoint current, described by its own meta;
training in place (`--load X --save X`) works run after run.
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

from megatron_prune.checkpoint import dist_ckpt
from megatron_prune.checkpoint import megatron_io as mio
from megatron_prune.checkpoint.atomic import atomic_file, fsync_tree, temp_name
from megatron_prune.checkpoint.dist_files import dist_common
from megatron_prune.checkpoint.errors import CheckpointError
from megatron_prune.checkpoint.hf_io import copy_tokenizer_files
from megatron_prune.checkpoint.safe_pickle import Opaque
from megatron_prune.model.dist import DistInfo
from megatron_prune.train.cpu_compat import torch_adam_fully_reshardable

DISTRIB_OPTIM_FILE = "distrib_optim_dp{:03d}.pt"
# megatron-core's sharded_state_dict content metadata, as Megatron-LM writes it (training/checkpointing.py
# _build_sharded_state_dict_metadata), with the optimizer form that reshards over DP and TP.
SHARDED_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "singleton_local_shards": False,
                    "chained_optim_avoid_prefix": True}
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
    meta: mio.CheckpointMeta  # at the job's parallel sizes for a torch_dist checkpoint
    format: str = "torch"

    @property
    def is_training_checkpoint(self) -> bool:
        return self.iteration != "release"


def find_resume_point(load: str, save: str | None, tp: int | None = None, pp: int | None = None) -> ResumePoint:
    """`save` if it already holds a checkpoint (restart after a stop or crash), else `load` (checked against its
    meta; a torch_dist one read at tp x pp)."""
    for root in ([Path(save)] if save else []) + [Path(load)]:
        if (root / mio.TRACKER).is_file():
            ck = mio.open_checkpoint(root, tp, pp)
            return ResumePoint(root=root, iteration=ck.iteration, meta=ck.meta, format=ck.format)
    raise mio.not_a_checkpoint(load)


# ---------------------------------------------------------------------------------------------- RNG
def rng_state() -> list[dict[str, Any]]:
    """Megatron-LM's layout (training/checkpointing.py get_rng_state): a list with this rank's generators."""
    import numpy as np
    from megatron.core.tensor_parallel import random as mp_random

    state = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
             "torch_rng_state": torch.get_rng_state(),
             "rng_tracker_states": mp_random.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda_rng_state"] = torch.cuda.get_rng_state()
    return [state]


def set_rng_state(state: list | dict[str, Any], dp_rank: int = 0) -> None:
    """Restore Megatron-LM's layout, or the dict of earlier releases ({python, torch, tracker, cuda}). numpy's
    global generator is restored only when its state was read as data (safe_pickle reads numpy arrays as inert
    values; nothing in training draws from it)."""
    import numpy as np
    from megatron.core.tensor_parallel import random as mp_random

    if isinstance(state, list):
        s = state[dp_rank] if len(state) > dp_rank else state[0]
        python, cpu, tracker = s["random_rng_state"], s["torch_rng_state"], s["rng_tracker_states"]
        cuda, numpy_state = s.get("cuda_rng_state"), s.get("np_rng_state")
    else:
        python, cpu, tracker, cuda, numpy_state = state["python"], state["torch"], state["tracker"], \
            state.get("cuda"), None
    random.setstate(_as_tuple(python))
    torch.set_rng_state(cpu)
    mp_random.get_cuda_rng_tracker().set_states(tracker)
    if torch.cuda.is_available() and isinstance(cuda, torch.Tensor):
        torch.cuda.set_rng_state(cuda)
    if isinstance(numpy_state, tuple) and not any(isinstance(x, Opaque) for x in numpy_state):
        np.random.set_state(numpy_state)


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
                    keep_last: int, tokenizer_src: Path | None = None, ckpt_format: str = "torch") -> Path:
    """Write iteration `progress.iteration` on every rank; returns the iteration directory."""
    root = Path(root)
    it = progress.iteration
    dist_opts = _distributed_optimizers(optimizer)
    # Before its first applied step (e.g. only fp16 overflows so far) megatron's DistributedOptimizer cannot
    # produce a state dict; a fresh optimizer is then the exact state, so none is saved.
    stepped = all(len(o.optimizer.state) > 0 for o in dist_opts)
    args = mio.megatron_args(meta, consumed_train_samples=progress.consumed_train_samples, iteration=it,
                             ckpt_format=ckpt_format, use_distributed_optimizer=bool(dist_opts), **args_extra)
    if ckpt_format == "torch_dist":
        _save_dist(root, it, model, optimizer if stepped else None, scheduler, args, info, progress, bool(dist_opts))
    else:
        _save_legacy(root, it, model, optimizer, stepped, dist_opts, scheduler, args, info, progress)
    dist.barrier()
    if info.rank == 0:
        _commit(root, it, meta, tokenizer_src)
        prune_old_checkpoints(root, keep_last)
    dist.barrier()
    return root / mio.iteration_dir_name(it)


def _save_legacy(root: Path, it: int, model, optimizer, stepped: bool, dist_opts: list, scheduler, args,
                 info: DistInfo, progress: Progress) -> None:
    if info.dp_rank == 0:
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


def _save_dist(root: Path, it: int, model, optimizer, scheduler, args, info: DistInfo, progress: Progress,
               distributed_optimizer: bool) -> None:
    """Every rank: model and optimizer shards (megatron-core's own sharded_state_dict) and the common state into a
    temporary sibling of the iteration directory, which rank 0 fsyncs and renames into place."""
    from megatron.core.dist_checkpointing import ShardedObject

    folder = root / mio.iteration_dir_name(it)
    box = [str(root / temp_name(folder.name))] if info.rank == 0 else [None]
    dist.broadcast_object_list(box, src=0)
    tmp = Path(box[0])
    if info.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    module = getattr(model, "module", model)
    state: dict[str, Any] = {"model": module.sharded_state_dict()}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, metadata=SHARDED_METADATA)
    state["rng_state"] = ShardedObject("rng_state", rng_state(), (info.pp, info.tp), (info.pp_rank, info.tp_rank),
                                       replica_id=info.dp_rank)
    common = dist_common(args, it, opt_param_scheduler=scheduler.state_dict(), optimizer_saved=optimizer is not None,
                         consumed_train_samples=progress.consumed_train_samples,
                         distributed_optimizer=distributed_optimizer)
    try:
        dist_ckpt.save(tmp, state, common, content_metadata=SHARDED_METADATA)
        dist.barrier()
        if info.rank == 0:
            fsync_tree(tmp)
            shutil.rmtree(folder, ignore_errors=True)  # an untracked leftover of an interrupted save
            tmp.rename(folder)
    except BaseException:
        if info.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


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
                           info: DistInfo, model=None) -> Progress:
    """Optimizer, scheduler, RNG and data position from a training checkpoint's rank file (after the
    model weights were loaded and the optimizer built). torch_dist: at any DP / TP size (RNG state only at the
    sizes that saved it)."""
    if point.format == "torch_dist":
        return _restore_dist(point, state, optimizer, scheduler, info, model)
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


def _restore_dist(point: ResumePoint, state: dict[str, Any], optimizer, scheduler, info: DistInfo,
                  model) -> Progress:
    if state.get("opt_param_scheduler") is None:
        raise CheckpointError(f"{point.root}: iteration {point.iteration} lacks opt_param_scheduler (not written by "
                              f"training?); pass --finetune to take only its weights")
    index = dist_ckpt.read_index(point.root / mio.iteration_dir_name(point.iteration))
    if state.get("optimizer_saved", state.get("optimizer") is not None):
        _check_optimizer_kind(point, state, bool(_distributed_optimizers(optimizer)))
        module = getattr(model, "module", model)
        metadata = state.get("content_metadata") or SHARDED_METADATA
        _allocate_states(_distributed_optimizers(optimizer))
        request = {"optimizer": optimizer.sharded_state_dict({"model": module.sharded_state_dict()}, is_loading=True,
                                                             metadata=metadata)}
        loaded = dist_ckpt.load_state(index, request)
        with torch.no_grad(), torch_adam_fully_reshardable():  # copies into main params that require grad
            optimizer.load_state_dict(loaded["optimizer"])
        _unshare_adam_steps(_distributed_optimizers(optimizer))
    scheduler.load_state_dict(state["opt_param_scheduler"])
    args = state.get("args")
    saved = (getattr(args, "pipeline_model_parallel_size", None), getattr(args, "tensor_model_parallel_size", None))
    if saved == (info.pp, info.tp):  # generators of another TP/PP layout do not map onto these ranks
        rng = dist_ckpt.read_object(index, f"rng_state/shard_{info.pp_rank}.{info.tp_rank}_{info.pp}.{info.tp}")
        if rng is not None:
            set_rng_state(rng, info.dp_rank)
    return Progress(iteration=int(point.iteration),
                    consumed_train_samples=int(state.get("consumed_train_samples", 0)))


def _allocate_states(dist_opts: list) -> None:
    """megatron-core's DistributedOptimizer.state_dict() (which sharded_state_dict calls) needs allocated Adam state
    when torch's AdamW stands in for apex/TE's (CPU): allocate it by the step megatron-core itself uses for loading
    (zero gradients; every value it touches is then overwritten by the checkpoint's)."""
    for opt in dist_opts:
        if len(opt.optimizer.state) == 0 and hasattr(opt, "_init_optimizer_states_with_dummy_values"):
            with torch.no_grad():
                opt._init_optimizer_states_with_dummy_values()


def _check_optimizer_kind(point: ResumePoint, state: dict[str, Any], use_distributed_optimizer: bool) -> None:
    saved_dist = bool(state.get("distributed_optimizer", getattr(state.get("args"), "use_distributed_optimizer",
                                                                 False)))
    if saved_dist != use_distributed_optimizer:
        raise CheckpointError(f"{point.root}: iteration {point.iteration} was saved "
                              f"{'with' if saved_dist else 'without'} --use-distributed-optimizer; resume the "
                              f"same way (or pass --finetune for a fresh optimizer)")


def check_optimizer_files(point: ResumePoint, state: dict[str, Any], info: DistInfo,
                          use_distributed_optimizer: bool) -> None:
    """Before any rank restores optimizer state: the saved kind matches, and with the distributed optimizer the
    shards match this job's data-parallel size (megatron-core would fail with a bare AssertionError, and only
    on some ranks)."""
    if state.get("optimizer") is None:  # saved before any applied step: nothing to restore
        return
    _check_optimizer_kind(point, state, use_distributed_optimizer)
    if point.format == "torch_dist" or not use_distributed_optimizer:
        return  # torch_dist: megatron-core reshards the optimizer state to any DP size
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
    _check_optimizer_kind(point, state, bool(dist_opts))
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
