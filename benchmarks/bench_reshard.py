"""Benchmark: reshard a LLaMA-2-7B-shaped synthetic bf16 checkpoint TP=8 -> TP=2, beside a plain copy.

    python benchmarks/bench_reshard.py               # full 7B shape (needs ~45 GB of free disk)
    python benchmarks/bench_reshard.py --layers 4    # smaller

Targets (issue 4): wall time <= 1.5x the plain copy; peak RSS <= 1.3x the largest output shard + 0.5 GiB.
Results go to benchmarks/RESULTS.md (section "reshard").
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (cleanup, dir_bytes, gib, hf_config, largest_file, plain_copy, python_cmd, timed,  # noqa: E402
                    write_section, write_synthetic_hf)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="7b", choices=["7b", "1b"])
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--src-tp", type=int, default=8)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_reshard_"))
    hf, src, copy, out = work / "hf", work / "src", work / "copy", work / "out"
    cfg = hf_config(args.shape, args.layers)
    try:
        write_synthetic_hf(hf, cfg)
        timed(python_cmd("convert", "hf-to-megatron", "--hf-dir", str(hf), "--save", str(src),
                         "--tp", str(args.src_tp), "--no-progress"))
        cleanup(hf)
        nbytes = dir_bytes(src)
        t_copy = plain_copy(src, copy)
        cleanup(copy)
        wall, rss = timed(python_cmd("reshard", "--load", str(src), "--save", str(out), "--tp", str(args.tp),
                                     "--no-progress"))
        shard = largest_file(out, "model_optim_rng.pt")
        written = dir_bytes(out)
    finally:
        cleanup(hf, src, copy, out)
        if not args.workdir:
            cleanup(work)
    target = 1.3 * shard + 0.5 * 2**30
    body = f"""## Resharding: {args.shape} shape, {cfg['num_hidden_layers']} layers, bf16, TP={args.src_tp} -> TP={args.tp}

Command: `python benchmarks/bench_reshard.py{' --layers ' + str(args.layers) if args.layers else ''}` (2-core CPU machine, warm page cache).

| metric | value | target |
|---|---|---|
| bytes read (TP={args.src_tp} checkpoint) | {gib(nbytes)} | |
| bytes written (TP={args.tp} checkpoint) | {gib(written)} | |
| plain copy of the input (`cp -r` + sync) | {t_copy:.1f} s | |
| reshard wall time (incl. process start + sync) | {wall:.1f} s | |
| ratio wall / copy | {wall / t_copy:.2f}x | <= 1.5x {'(met)' if wall <= 1.5 * t_copy else '(NOT met)'} |
| largest output shard | {gib(shard)} | |
| peak RSS (/usr/bin/time -v) | {gib(rss)} | <= {gib(target)} {'(met)' if rss <= target else '(NOT met)'} |
"""
    print(body)
    if not args.no_write:
        write_section("reshard", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
