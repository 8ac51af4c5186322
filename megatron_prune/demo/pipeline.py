"""The demo's stages, each a subprocess running the same command a user would type, timed and summarised.

Keeping every stage a real CLI call (torchrun for the distributed ones) means the demo exercises exactly the
user-facing entry points, not a private shortcut.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class StageLog:
    rows: list[tuple[str, float, str]] = field(default_factory=list)

    def add(self, name: str, seconds: float, note: str = "") -> None:
        self.rows.append((name, seconds, note))
        print(f"[demo] {name}: {seconds:.1f} s {note}", flush=True)

    def table(self) -> str:
        width = max(len(r[0]) for r in self.rows)
        lines = [f"| {'stage'.ljust(width)} | time (s) | result |", f"|{'-' * (width + 2)}|---------:|--------|"]
        lines += [f"| {n.ljust(width)} | {s:8.1f} | {note} |" for n, s, note in self.rows]
        return "\n".join(lines)


class StageError(RuntimeError):
    pass


def run_cli(args: list[str], nproc: int = 0, log: Path | None = None, env: dict | None = None) -> str:
    """Run `python -m megatron_prune ARGS` (under torchrun when nproc > 0); return stdout, raise with the tail."""
    cmd = [sys.executable, "-m", "megatron_prune", *args]
    if nproc:
        # cli.launch = torchrun, minus torchrun's traceback wall when a worker already said what went wrong
        cmd = [sys.executable, "-m", "megatron_prune.cli.launch", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "megatron_prune", *args]
    threads = max(1, (os.cpu_count() or 2) // max(nproc, 1))
    full_env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}\n")
    if proc.returncode != 0:
        raise StageError(f"`{' '.join(cmd[2:])}` failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def last_json(stdout: str) -> dict:
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise StageError(f"no JSON result in output:\n{stdout[-2000:]}")


def timed(log: StageLog, name: str, fn, note=None):
    """Run fn(), record its wall time and `note(result)` in the stage table, return the result."""
    t0 = time.perf_counter()
    result = fn()
    log.add(name, time.perf_counter() - t0, note(result) if note else "")
    return result
