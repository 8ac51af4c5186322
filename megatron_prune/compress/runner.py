"""Run one CLI stage as a subprocess: `python -m megatron_prune ARGS`, or the same under torchrun through
cli/prelaunch.py (its one-process checks first) or cli/launch.py. Shared by `compress` and the demo, so both run
exactly the commands a user would type. Output is captured, and streamed live when asked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path


class StageError(RuntimeError):
    pass


@dataclass(frozen=True)
class Finished:
    stdout: str
    stderr: str
    peak_rss: int          # bytes: the largest resident set of the command and the processes it waited for


def cli_command(args: list[str], nproc: int = 0, prelaunch: list[str] | None = None) -> list[str]:
    """The command line: plain (nproc 0), torchrun through cli/launch.py (nproc > 0), or through cli/prelaunch.py
    (`prelaunch` = its options, e.g. ["--nproc", "2"]: the subcommand's own checks pick the process count)."""
    if prelaunch is not None:
        return [sys.executable, "-m", "megatron_prune.cli.prelaunch", *prelaunch, "--standalone", "--", *args]
    if nproc:
        # cli.launch = torchrun, minus torchrun's traceback wall when a worker already said what went wrong
        return [sys.executable, "-m", "megatron_prune.cli.launch", "--standalone", f"--nproc-per-node={nproc}",
                "-m", "megatron_prune", *args]
    return [sys.executable, "-m", "megatron_prune", *args]


def run_command(cmd: list[str], env: dict | None = None, log: Path | None = None, stream: bool = False) -> Finished:
    """Run `cmd` with os.environ + `env`; raise StageError with the error output's tail when it fails."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    out: list[str] = []
    err: list[str] = []
    pumps = [threading.Thread(target=_pump, args=(proc.stdout, out, sys.stdout if stream else None)),
             threading.Thread(target=_pump, args=(proc.stderr, err, sys.stderr if stream else None))]
    for t in pumps:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    for t in pumps:
        t.join()
    stdout, stderr = "".join(out), "".join(err)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n{stdout}\n{stderr}\n")
    if proc.returncode != 0:
        shown = " ".join(cmd[2:])
        raise StageError(f"`{shown}` failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    return Finished(stdout, stderr, usage.ru_maxrss * 1024)


def _pump(pipe, sink: list[str], echo) -> None:
    for line in pipe:
        sink.append(line)
        if echo is not None:
            echo.write(line)
            echo.flush()
    pipe.close()


def last_json(stdout: str) -> dict:
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise StageError(f"no JSON result in output:\n{stdout[-2000:]}")
