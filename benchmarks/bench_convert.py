"""Benchmark: hf-to-megatron on a LLaMA-2-7B-shaped synthetic bf16 checkpoint at TP=8, beside a plain copy.

    python benchmarks/bench_convert.py                 # full 7B shape (~13.5 GB written twice; needs ~45 GB disk)
    python benchmarks/bench_convert.py --layers 4      # smaller, same tensor sizes per layer

Targets (issue 2): wall time <= 1.5x the plain copy; peak RSS <= 1.3x the largest output shard + 0.5 GiB.
Results go to benchmarks/RESULTS.md (section "convert").
"""

from __future__ import annotations

import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (cleanup, dir_bytes, gib, hf_config, largest_file, plain_copy, python_cmd,  # noqa: E402
                    synthetic_parser, timed, write_section, write_synthetic_hf)


def main() -> int:
    args = synthetic_parser(__doc__).parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    hf, copy, out = work / "hf", work / "copy", work / "mg"
    cfg = hf_config(args.shape, args.layers)
    try:
        print(f"writing synthetic {args.shape} checkpoint ({cfg['num_hidden_layers']} layers) to {hf} ...", flush=True)
        nbytes = write_synthetic_hf(hf, cfg)
        t_copy = plain_copy(hf, copy)
        cleanup(copy)
        wall, rss = timed(python_cmd("convert", "hf-to-megatron", "--hf-dir", str(hf), "--save", str(out),
                                     "--tp", str(args.tp), "--no-progress"))
        written, shard = dir_bytes(out), largest_file(out, "model_optim_rng.pt")
    finally:
        cleanup(hf, copy, out)
        if not args.workdir:
            cleanup(work)
    rss_target = 1.3 * shard + 0.5 * 2**30
    body = f"""## Conversion: hf-to-megatron, {args.shape} shape, {cfg['num_hidden_layers']} layers, bf16, TP={args.tp}

Command: `python benchmarks/bench_convert.py{' --layers ' + str(args.layers) if args.layers else ''}` on {platform.node() and 'this project'}'s CPU machine ({platform.processor() or platform.machine()}, 2 cores).
Warm page cache (the synthetic input was just written).

| metric | value | target |
|---|---|---|
| bytes read (HF safetensors) | {gib(nbytes)} | |
| bytes written (Megatron shards) | {gib(written)} | |
| plain copy of the input (`cp -r` + sync) | {t_copy:.1f} s | |
| hf-to-megatron wall time (incl. process start + sync) | {wall:.1f} s | |
| ratio wall / copy | {wall / t_copy:.2f}x | <= 1.5x {'(met)' if wall <= 1.5 * t_copy else '(NOT met)'} |
| largest output shard | {gib(shard)} | |
| peak RSS (/usr/bin/time -v) | {gib(rss)} | <= {gib(rss_target)} {'(met)' if rss <= rss_target else '(NOT met)'} |
"""
    print(body)
    if not args.no_write:
        write_section("convert", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
