"""Run one CLI stage as a subprocess: `python -m megatron_prune ARGS`, or the same under torchrun through
cli/prelaunch.py (its one-process checks first) or cli/launch.py. The one stage runner of `compress` and the demo
(and the benchmarks built on them), so each runs exactly the commands a user would type. Output is kept, appended
to the stage's log as it comes, and streamed to the job's terminal when one is given (compress/terminal.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from megatron_prune.compress.terminal import LogSink, Terminal, pump


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


def run_command(cmd: list[str], env: dict | None = None, log: Path | None = None,
                terminal: Terminal | None = None) -> Finished:
    """Run `cmd` with os.environ + `env` (unbuffered: its lines reach the terminal when printed); raise StageError
    with the error output's tail when it fails. Ctrl-C while it runs ends the command with the job."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    sink = LogSink(log)
    sink.write(f"$ {' '.join(cmd)}")
    out: list[str] = []
    err: list[str] = []
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env)
        try:
            readers = [threading.Thread(target=pump, args=(proc.stdout, out, sink, terminal), daemon=True),
                       threading.Thread(target=pump, args=(proc.stderr, err, sink, terminal), daemon=True)]
            for t in readers:
                t.start()
            for t in readers:
                t.join()
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    finally:
        sink.close()
    stdout, stderr = "".join(out), "".join(err)
    if proc.returncode != 0:
        shown = " ".join(cmd[2:])
        raise StageError(f"`{shown}` failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    return Finished(stdout, stderr, usage.ru_maxrss * 1024)


def last_json(stdout: str) -> dict:
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise StageError(f"no JSON result in output:\n{stdout[-2000:]}")
