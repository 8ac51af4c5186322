"""The demo's stages, each a subprocess running the same command a user would type, timed and summarised, through
compress's one stage runner (compress/runner.py) and terminal (compress/terminal.py); and the environment that
fixes the demo's floating-point results.

Keeping every stage a real CLI call (torchrun for the distributed ones) means the demo exercises exactly the
user-facing entry points, not a private shortcut.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron_prune.compress.runner import StageError, cli_command, last_json, run_command
from megatron_prune.compress.terminal import Terminal

__all__ = ["StageError", "last_json", "run_cli", "timed"]


@dataclass
class StageLog:
    rows: list[tuple[str, float, str]] = field(default_factory=list)

    def add(self, name: str, seconds: float, note: str = "") -> None:
        self.record(name, seconds, note)
        terminal.job(f"{name}: {seconds:.1f} s {note}".rstrip())

    def record(self, name: str, seconds: float, note: str = "") -> None:
        """A row whose closing line was printed already (a compress stage's)."""
        self.rows.append((name, seconds, note))


terminal = Terminal("demo")  # the demo's lines and its stages' output, on stdout


# Threads per process, fixed whatever the machine's core count or load: a CPU kernel's floating-point reduction
# order can depend on its thread count, and the recovery training carries a last-bit difference in one step into
# different weights (issue 23). The demo's 2-core budget split over a stage's processes: 2 for one process, 1 each
# for 2 or 3 torchrun workers (what a 2-core machine gave when this followed os.cpu_count()).
CORES = 2
# torch's CPU kernels come in AVX2 and AVX-512 builds whose results differ in the last bits; torch picks the widest
# the CPU has. Measured (issue 23): the same recovery gave held-out perplexity 257.15 with the AVX-512 kernels of
# an AMD EPYC and 107.62 with its AVX2 kernels, the number of a machine without AVX-512. Pinned to AVX2, which
# every x86-64 CPU of the last decade has, so AVX2 and AVX-512 machines compute the same numbers.
KERNELS = "avx2"


def numeric_env(nproc: int) -> dict[str, str]:
    """Environment that fixes a stage's CPU arithmetic: OpenMP and MKL thread counts, no dynamic thread
    adjustment (MKL may otherwise use fewer threads than asked), and torch's kernel ISA where the CPU has it."""
    threads = str(threads_per_process(nproc))
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OMP_DYNAMIC": "FALSE", "MKL_DYNAMIC": "FALSE"}
    if KERNELS in cpu_flags():
        env["ATEN_CPU_CAPABILITY"] = KERNELS
    return env


def threads_per_process(nproc: int) -> int:
    return max(1, CORES // max(nproc, 1))


def cpu_flags() -> set[str]:
    """The CPU's feature flags (x86 Linux); empty where /proc/cpuinfo has none (then nothing is pinned)."""
    line = next((line for line in _read("/proc/cpuinfo").splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def environment() -> dict:
    """What decides the demo's floating-point results besides its code and seed, for demo_results.json."""
    import platform

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "kernels": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "threads_per_process": {n: threads_per_process(n) for n in (1, 2, 3)}}


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def run_cli(args: list[str], nproc: int = 0, log: Path | None = None, env: dict | None = None) -> str:
    """Run `python -m megatron_prune ARGS` (under torchrun when nproc > 0) with the demo's numeric environment, its
    output streamed to the terminal (indented) and appended to `log` as it comes; return stdout, raise with the
    tail of stderr."""
    env = {**numeric_env(nproc), "PYTHONWARNINGS": "ignore", **(env or {})}
    return run_command(cli_command(args, nproc), env, log, terminal).stdout


def timed(log: StageLog, name: str, fn, note=None):
    """Run fn(), record its wall time and `note(result)` in the stage table, return the result."""
    with terminal.stage(name):
        t0 = time.perf_counter()
        result = fn()
    log.add(name, time.perf_counter() - t0, note(result) if note else "")
    return result
