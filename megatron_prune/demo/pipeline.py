"""The demo's stages, each a subprocess running the same command a user would type, timed and summarised.

Keeping every stage a real CLI call (torchrun for the distributed ones) means the demo exercises exactly the
user-facing entry points, not a private shortcut.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from megatron_prune.compress.runner import StageError

__all__ = ["StageError", "last_json", "run_cli", "timed"]


@dataclass
class StageLog:
    rows: list[tuple[str, float, str]] = field(default_factory=list)

    def add(self, name: str, seconds: float, note: str = "") -> None:
        self.rows.append((name, seconds, note))
        terminal.say(f"[demo] {name}: {seconds:.1f} s {note}".rstrip())


# A stage that has printed nothing for this long gets a "still running" line, so the terminal never stays silent
# for long whatever the stage (in-process HF evaluation, a torchrun start-up, a slow machine).
HEARTBEAT_S = 10.0
# A progress bar redraws its line (carriage returns); the terminal gets one of its states this often at most.
BAR_EVERY_S = 5.0
INDENT = "    "  # a stage's own output, under its "[demo] NAME ..." line


class Terminal:
    """The demo's terminal: one line at a time (stage output comes from two reader threads), and a heartbeat
    thread that says which stage is still running when nothing was printed for HEARTBEAT_S."""

    def __init__(self, heartbeat_s: float = HEARTBEAT_S):
        self.heartbeat_s = heartbeat_s
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._stage: tuple[str, float] | None = None
        self._thread: threading.Thread | None = None

    def say(self, line: str) -> None:
        with self._lock:
            print(line, flush=True)
            self._last = time.monotonic()

    def begin(self, name: str) -> None:
        with self._lock:
            self._stage = (name, time.monotonic())
        if self._thread is None:  # started by the first stage, not on import
            self._thread = threading.Thread(target=self._beat, name="demo-heartbeat", daemon=True)
            self._thread.start()
        self.say(f"[demo] {name} ...")

    def end(self) -> None:
        with self._lock:
            self._stage = None

    @contextlib.contextmanager
    def stage(self, name: str):
        self.begin(name)
        try:
            yield
        finally:
            self.end()

    def _beat(self) -> None:
        while True:
            time.sleep(1.0)
            with self._lock:
                now = time.monotonic()
                if self._stage is not None and now - self._last >= self.heartbeat_s:
                    name, start = self._stage
                    print(f"[demo] ... still running: {name}, {now - start:.0f} s", flush=True)
                    self._last = now


terminal = Terminal()


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
    """Run `python -m megatron_prune ARGS` (under torchrun when nproc > 0), its output streamed to the terminal
    (indented) and appended to `log` as it comes; return stdout, raise with the tail of stderr."""
    cmd = [sys.executable, "-m", "megatron_prune", *args]
    if nproc:
        # cli.launch = torchrun, minus torchrun's traceback wall when a worker already said what went wrong
        cmd = [sys.executable, "-m", "megatron_prune.cli.launch", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "megatron_prune", *args]
    # unbuffered: a stage's lines reach the terminal when printed, not when its pipe buffer fills
    full_env = {**os.environ, **numeric_env(nproc), "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1",
                **(env or {})}
    sink = _LogSink(log)
    sink.write(f"$ {' '.join(cmd)}")
    out, err = [], []
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env)
        try:
            readers = [threading.Thread(target=_pump, args=(proc.stdout, out, sink), daemon=True),
                       threading.Thread(target=_pump, args=(proc.stderr, err, sink), daemon=True)]
            for t in readers:
                t.start()
            for t in readers:
                t.join()
            returncode = proc.wait()
        except BaseException:  # Ctrl-C while a stage runs: the stage's processes end with the demo
            proc.kill()
            proc.wait()
            raise
    finally:
        sink.close()
    if returncode != 0:
        raise StageError(f"`{' '.join(cmd[2:])}` failed (exit {returncode}):\n{''.join(err)[-3000:]}")
    return "".join(out)


class _LogSink:
    """demo.log, appended by both reader threads of a stage (one line at a time)."""

    def __init__(self, path: Path | None):
        self._lock = threading.Lock()
        self._file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a")

    def write(self, line: str) -> None:
        if self._file is not None:
            with self._lock:
                self._file.write(line + "\n")
                self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _pump(stream: IO[bytes], keep: list[str], sink: _LogSink) -> None:
    """Copy a stage's output stream: every line into `keep`, the log and the terminal (indented). A progress
    bar's redraws (segments ended by a carriage return) reach the terminal and the log every BAR_EVERY_S at most,
    and its last state before it is cleared or followed by a line; JSON result lines reach only the log (the demo
    prints its own summary of them)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span two reads
    pending, last_bar, held = "", float("-inf"), None
    for chunk in iter(lambda: stream.read1(65536), b""):
        *segments, pending = _segments(pending + decoder.decode(chunk))
        for text, end in segments:
            if end != "\r":
                keep.append(text + "\n")
            if not text.strip() or end != "\r":
                if held is not None:  # the bar's last state, before it is cleared or a line follows
                    _show(held, sink)
                    held = None
            elif time.monotonic() - last_bar < BAR_EVERY_S:
                held = text
                continue
            else:
                last_bar, held = time.monotonic(), None
            if text.strip():
                _show(text, sink)
    pending += decoder.decode(b"", final=True)
    if held is not None:
        _show(held, sink)
    if pending.strip():
        keep.append(pending)
        _show(pending, sink)
    stream.close()


def _show(text: str, sink: _LogSink) -> None:
    sink.write(text)
    if not text.startswith("{"):
        terminal.say(INDENT + text.rstrip())


def _segments(text: str) -> list:
    """[(segment, terminator), ...] for each complete segment of `text`, then the unterminated rest."""
    parts = re.split(r"(\r\n|\n|\r)", text)
    done = [(parts[i], "\n" if parts[i + 1] == "\r\n" else parts[i + 1]) for i in range(0, len(parts) - 1, 2)]
    return [*done, parts[-1]]


def last_json(stdout: str) -> dict:
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise StageError(f"no JSON result in output:\n{stdout[-2000:]}")


def timed(log: StageLog, name: str, fn, note=None):
    """Run fn(), record its wall time and `note(result)` in the stage table, return the result."""
    with terminal.stage(name):
        t0 = time.perf_counter()
        result = fn()
    log.add(name, time.perf_counter() - t0, note(result) if note else "")
    return result
