"""What a prune run is asked to do, validated once at the edge (cli.prune builds it from the flags).

    PruneConfig(load, save, target=PruneTarget(...))            sizes given by hand, or
    PruneConfig(load, save, plan="prune_plan.json")              a saved plan re-applied, or
    PruneConfig(load, save, search=SearchConfig("50%"))          a budget: the sizes searched (prune.search_run)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_prune.errors import InputError
from megatron_prune.prune.calib import CalibConfig
from megatron_prune.prune.plan import IMPORTANCES
from megatron_prune.prune.search_space import SearchLimits
from megatron_prune.prune.select import PruneTarget


@dataclass(frozen=True)
class SearchConfig:
    target_params: str | None            # a count or a percentage (budget.make_budget), and/or
    target_memory_gb: str | None = None  # GiB of bf16 weights + KV cache of memory_batch_size x memory_seq_length
    memory_seq_length: int | None = None  # None: the model's max_position_embeddings
    memory_batch_size: int = 1
    limits: SearchLimits = field(default_factory=SearchLimits)
    eval_samples: int = 16   # held-out calibration windows that rank the candidates
    kd_iters: int = 0        # distillation steps per candidate before it is evaluated
    kd_lr: float = 1e-4

    def __post_init__(self) -> None:
        if self.eval_samples < 1:
            raise InputError(f"--search-eval-samples must be >= 1, got {self.eval_samples}")
        if self.kd_iters < 0:
            raise InputError(f"--search-kd-iters must be >= 0, got {self.kd_iters}")
        if not self.kd_lr > 0:
            raise InputError(f"--search-kd-lr must be > 0, got {self.kd_lr}")


@dataclass(frozen=True)
class PruneConfig:
    load: str
    save: str
    target: PruneTarget | None = None   # what to keep (made into a plan), or
    plan: str | None = None             # a saved plan to re-apply, or
    importance: str = "random"
    seed: int = 1234
    calib: CalibConfig = field(default_factory=CalibConfig)
    mode: str | None = None             # with `plan`: override the plan's mode (global accepts uneven shards)
    overwrite: bool = False
    progress: bool = True
    allow_non_finite: bool = False      # else pruned tensors holding NaN / Inf are refused before writing
    search: SearchConfig | None = None  # or a parameter / memory budget: search the sizes (prune.search_run)

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.target, self.plan, self.search)) != 1:
            raise InputError("give one of: target sizes, --plan FILE, a budget (--target-params N / "
                             "--target-memory-gb G)")
        if self.importance not in IMPORTANCES:
            raise InputError(f"--importance {self.importance!r} is not one of {', '.join(IMPORTANCES)}")

    def inputs(self) -> dict[str, str | None]:
        """Every path this run reads (the output must not overlap any of them)."""
        return {"--load": self.load, "--plan": self.plan, "--calib-data": self.calib.data,
                "--tokenizer": self.calib.tokenizer}
