"""CPU distributed test harness: run `module:function(payload)` on N gloo processes under torchrun.

    results = run_distributed(2, "tests.dist.cases:parity", {"ckpt": "..."})   # one result per rank

Each rank's return value is pickled back to the caller; an exception on any rank fails the call with that
rank's traceback. Put several checks in one function: each launch costs ~6 s (process start, import megatron).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import torch


def run_distributed(nproc: int, target: str, payload: dict[str, Any] | None = None, timeout: float = 600,
                    env: dict[str, str] | None = None) -> list[Any]:
    with tempfile.TemporaryDirectory(prefix="mp_dist_") as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "megatron_prune.testing", target, json.dumps(payload or {}), out]
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
                    "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]), **(env or {})}
        proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)
        errors = sorted(Path(out).glob("rank*.err"))
        if errors:
            raise AssertionError(f"{target} failed:\n" + "\n".join(e.read_text() for e in errors))
        if proc.returncode != 0:
            raise AssertionError(f"torchrun exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(nproc)]


def _worker(target: str, payload: str, out: str) -> int:
    rank = int(os.environ.get("RANK", 0))
    try:
        from megatron_prune.model.dist import init_process_group

        init_process_group()
        module, func = target.split(":")
        result = getattr(importlib.import_module(module), func)(json.loads(payload))
        torch.save(result, Path(out) / f"rank{rank}.pt")
        return 0
    except BaseException:
        (Path(out) / f"rank{rank}.err").write_text(f"--- rank {rank} ---\n{traceback.format_exc()}")
        return 1


if __name__ == "__main__":
    sys.exit(_worker(*sys.argv[1:4]))
