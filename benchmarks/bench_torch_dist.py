"""Benchmark: both checkpoint formats on a LLaMA-2-7B-shaped synthetic bf16 model, beside a plain copy.

    python benchmarks/bench_torch_dist.py              # full 7B shape (~13.5 GB per copy; needs ~42 GB of free disk)
    python benchmarks/bench_torch_dist.py --layers 4   # smaller, same tensor sizes per layer

Steps (each a fresh `python -m megatron_prune ...` process, timed with a final sync, peak RSS of the process tree):
convert HF -> torch_dist (TP=8) and HF -> legacy (TP=8); export each to HF; reshard legacy TP=8 -> torch_dist and
torch_dist -> legacy TP=2. Peak RSS is split into anonymous memory (what the process really holds) and file-backed
pages (memory-mapped checkpoint bytes, which the kernel reclaims under pressure), proportional set sizes sampled
from /proc/PID/smaps_rollup every 0.2 s over the whole process tree (torch_dist writers fork: a page they share
counts once); /usr/bin/time's figure (largest single process, shared pages included) is given too. Outputs are deleted as soon as they are measured, to keep the disk footprint at about three copies.
Results go to benchmarks/RESULTS.md (section "torch_dist") unless --no-write.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (cleanup, dir_bytes, gib, hf_config, plain_copy, python_cmd, write_section,  # noqa: E402
                    synthetic_parser, write_synthetic_hf)


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            continue
    return out


def _rss(pid: int) -> tuple[int, int]:
    """(anonymous, file-backed) memory of a process tree, proportional set sizes (a page shared by forked processes
    is counted once in total, not once per process)."""
    anon = file = 0
    for p in _tree(pid):
        try:
            rollup = Path(f"/proc/{p}/smaps_rollup").read_text()
        except OSError:
            continue
        for key, value in re.findall(r"^(Pss_Anon|Pss_File|Pss_Shmem):\s+(\d+) kB", rollup, re.M):
            if key == "Pss_Anon":
                anon += int(value) * 1024
            else:
                file += int(value) * 1024
    return anon, file


def measured(cmd: list[str]) -> dict:
    """wall (incl. sync), peak anonymous / file-backed / total RSS of the tree, /usr/bin/time's max RSS."""
    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(["/usr/bin/time", "-v", *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"anon": 0, "file": 0, "total": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            anon, file = _rss(proc.pid)
            peak.update(anon=max(peak["anon"], anon), file=max(peak["file"], file),
                        total=max(peak["total"], anon + file))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    subprocess.run(["sync"], check=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{out[-2000:]}\n{err[-4000:]}")
    time_rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", err).group(1)) * 1024
    return {"wall": wall, "time_rss": time_rss, **peak}


def main() -> int:
    args = synthetic_parser(__doc__).parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_torch_dist_"))
    hf, legacy, dist = work / "hf", work / "legacy", work / "dist"
    cfg = hf_config(args.shape, args.layers)
    rows, quiet = [], ["--no-progress"]

    def step(name: str, cmd: list[str], out: Path, keep: bool = False) -> None:
        print(f"{name} ...", flush=True)
        m = measured(python_cmd(*cmd))
        rows.append((name, m, dir_bytes(out)))
        print(f"  {m['wall']:.1f} s, anon {gib(m['anon'])}, file {gib(m['file'])}", flush=True)
        if not keep:
            cleanup(out)

    try:
        print(f"writing synthetic {args.shape} checkpoint ({cfg['num_hidden_layers']} layers) to {hf} ...", flush=True)
        nbytes = write_synthetic_hf(hf, cfg)
        t_copy = plain_copy(hf, work / "copy")
        cleanup(work / "copy")
        tp = str(args.tp)
        step("convert hf -> torch_dist", ["convert", "hf-to-megatron", "--hf-dir", str(hf), "--save", str(dist),
                                          "--tp", tp, "--ckpt-format", "torch_dist", *quiet], dist, keep=True)
        step("export torch_dist -> hf", ["convert", "megatron-to-hf", "--load", str(dist), "--save",
                                         str(work / "x"), *quiet], work / "x")
        cleanup(dist)
        step("convert hf -> legacy", ["convert", "hf-to-megatron", "--hf-dir", str(hf), "--save", str(legacy),
                                      "--tp", tp, *quiet], legacy, keep=True)
        cleanup(hf)
        step("export legacy -> hf", ["convert", "megatron-to-hf", "--load", str(legacy), "--save", str(work / "x"),
                                     *quiet], work / "x")
        step(f"reshard legacy tp{tp} -> torch_dist", ["reshard", "--load", str(legacy), "--save", str(dist), "--tp",
                                                      tp, "--ckpt-format", "torch_dist", *quiet], dist, keep=True)
        cleanup(legacy)
        step("reshard torch_dist -> legacy tp2", ["reshard", "--load", str(dist), "--save", str(work / "x"), "--tp",
                                                  "2", *quiet], work / "x")
    finally:
        cleanup(hf, legacy, dist, work / "copy", work / "x")
        if not args.workdir:
            cleanup(work)
    body = _report(args, cfg, nbytes, t_copy, rows)
    print(body)
    if not args.no_write:
        write_section("torch_dist", body)
    return 0


def _report(args, cfg: dict, nbytes: int, t_copy: float, rows: list) -> str:
    lines = [f"## Both checkpoint formats: {args.shape} shape, {cfg['num_hidden_layers']} layers, bf16, TP={args.tp}",
             "",
             f"Command: `nice -n 10 python benchmarks/bench_torch_dist.py"
             f"{' --layers ' + str(args.layers) if args.layers else ''}` on this project's CPU machine "
             f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores; other jobs were running). "
             f"Each step is a fresh process; wall time includes start-up, the torch / megatron-core imports and a "
             f"final sync. Peak memory of the process tree (proportional set sizes, sampled every 0.2 s): anonymous "
             f"(held by the processes) and file-backed (mapped checkpoint bytes, reclaimable); /usr/bin/time: "
             f"largest single process.",
             "",
             f"Plain copy of the {gib(nbytes)} HF input (`cp -r` + sync): {t_copy:.1f} s.",
             "",
             "| step | wall | wall / copy | bytes written | peak anon | peak file-backed | /usr/bin/time max RSS |",
             "|---|---|---|---|---|---|---|"]
    for name, m, written in rows:
        lines.append(f"| {name} | {m['wall']:.1f} s | {m['wall'] / t_copy:.2f}x | {gib(written)} | {gib(m['anon'])} "
                     f"| {gib(m['file'])} | {gib(m['time_rss'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
