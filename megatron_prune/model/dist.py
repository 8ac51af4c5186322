"""Process-group set-up for CUDA/NCCL and CPU/gloo. Returns what it made; the only global state is
megatron-core's own parallel_state, which megatron-core requires."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron_prune.errors import InputError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def init_process_group(timeout_s: int = 1800) -> None:
    """Initialise torch.distributed from torchrun's environment (or as a single process without it)."""
    if dist.is_initialized():
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        from megatron_prune.model import cpu_shims

        cpu_shims.install()
    if "RANK" not in os.environ:  # plain `python`: a world of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))


def init_model_parallel(tp: int, pp: int = 1, seed: int = 1234) -> DistInfo:
    """(Re)initialise megatron-core's parallel groups for tp x pp (x dp = world / (tp*pp)) and seed the RNGs."""
    from megatron.core import parallel_state as ps

    init_process_group()
    world = dist.get_world_size()
    if world % (tp * pp):
        raise InputError(f"world size {world} not divisible by tp*pp (tp={tp}, pp={pp}, world={world})")
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    info = DistInfo(rank=dist.get_rank(), world_size=world, tp=tp, pp=pp, dp=world // (tp * pp),
                    tp_rank=ps.get_tensor_model_parallel_rank(), pp_rank=ps.get_pipeline_model_parallel_rank(),
                    dp_rank=ps.get_data_parallel_rank(),
                    device=torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                    else torch.device("cpu"))
    _seed(seed, info)
    return info


def _seed(seed: int, info: DistInfo) -> None:
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        torch.manual_seed(seed + 100 * info.pp_rank)
        model_parallel_cuda_manual_seed(seed + 100 * info.pp_rank)
    else:
        from megatron_prune.model import cpu_shims

        cpu_shims.seed_model_parallel(seed, info.tp_rank, info.pp_rank)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shutdown() -> None:
    if not dist.is_initialized():  # nothing to tear down: skip the multi-second megatron import
        return
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
