"""The only place that adapts megatron-core to a machine without CUDA. Never used when CUDA is present.

megatron-core assumes a GPU in a few places (measured on 0.16.1, see shared notes):
1. factory calls with `device="cuda"` or `device=torch.cuda.current_device()` (rotary embedding, schedules,
   optimizer, mappings) -> a TorchFunctionMode rewrites any CUDA device argument to CPU, and
   `torch.cuda.current_device()` answers "cpu";
2. `torch.cuda.synchronize` / `torch.cuda.Stream` / `torch.cuda.Event` used for timing and overlap -> no-ops;
3. the model-parallel RNG tracker keeps CUDA generator states -> `CpuRngTracker` keeps CPU generator states,
   so dropout in TP regions still differs per rank as on GPU;
(megatron's optimizer and clip_grads check CUDA tensor type strings: `train/cpu_compat.py` handles that, scoped to
optimizer construction and clipping.)

`install()` is idempotent and returns False (doing nothing) when CUDA is available.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False


def _is_cuda_device(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, int) and not isinstance(dev, bool)


class _CudaToCpu(TorchFunctionMode):
    """Rewrite CUDA device arguments to CPU for every torch function and tensor method."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func in (torch.Tensor.cuda,):
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _NoOpStream:
    def __init__(self, *a, **k): ...
    def wait_stream(self, *a, **k): ...
    def synchronize(self): ...
    def record_event(self, *a, **k): return _NoOpEvent()
    def __enter__(self): return self
    def __exit__(self, *exc): return False


class _NoOpEvent:
    def __init__(self, *a, **k): ...
    def record(self, *a, **k): ...
    def synchronize(self): ...
    def wait(self, *a, **k): ...
    def elapsed_time(self, other): return 0.0


class CpuRngTracker:
    """Drop-in for megatron's CudaRNGStatesTracker that forks CPU generator states."""

    def __init__(self, *args, **kwargs):
        self.reset()

    def is_initialized(self):
        return self._initialized

    def reset(self):
        self.states_ = {}
        self.seeds_ = set()
        self._initialized = False

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self.states_ = dict(states)
        self._initialized = True

    def add(self, name, seed):
        self._initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


def install() -> bool:
    """Patch torch.cuda / megatron-core for CPU. No-op (returns False) when CUDA is available."""
    global _INSTALLED
    if torch.cuda.is_available():
        return False
    if _INSTALLED:
        return True
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.Stream = _NoOpStream
    torch.cuda.Event = _NoOpEvent
    torch.cuda.current_stream = lambda *a, **k: _NoOpStream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    _CudaToCpu().__enter__()  # stays active for the life of the process

    from megatron.core.tensor_parallel import random as mp_random

    mp_random._CUDA_RNG_STATE_TRACKER = CpuRngTracker()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _INSTALLED = True
    return True


def seed_model_parallel(seed: int, tp_rank: int, pp_rank: int = 0) -> None:
    """CPU counterpart of Megatron-LM's seeding (seed + 100 * pp_rank, then model_parallel_cuda_manual_seed)."""
    from megatron.core.tensor_parallel import random as mp_random

    seed = seed + 100 * pp_rank
    torch.manual_seed(seed)
    tracker = mp_random.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add(mp_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mp_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024)
