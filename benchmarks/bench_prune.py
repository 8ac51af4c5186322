"""Benchmark: the distributed pruner on a LLaMA-2-7B-shaped synthetic bf16 checkpoint at TP=8, pruned with a
random plan to the seed's 3.4B shape (28 layers, hidden 3072, FFN 8192, 24 heads), beside plain copies; and the
activation scoring pass against a plain forward pass over the same tokens.

    python benchmarks/bench_prune.py                    # full 7B shape (~13.5 GB in, ~6.3 GB out)
    python benchmarks/bench_prune.py --layers 8         # fewer layers, same tensor sizes per layer
    python benchmarks/bench_prune.py --scoring-only     # only the scoring-pass timing

Targets (issue 3): wall time <= 2x a plain copy of the bytes read and written; peak RSS per rank <= 1.3x its
input shard + 0.5 GiB; scoring pass <= 1.1x a plain forward pass.
Results go to the `prune` section of benchmarks/RESULTS.md (sub-blocks `bench` and `scoring`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESULTS, cleanup, dir_bytes, gib, hf_config, python_cmd, write_section,  # noqa: E402
                    write_synthetic_hf)

TARGET = ["--hidden-size-remain", "3072", "--num-attention-heads-remain", "24", "--ffn-hidden-size-remain", "8192",
          "--drop-layers", "7,13,18,24"]


def update_prune_section(sub: str, body: str) -> None:
    """Replace (or add) the `<!-- prune:SUB -->` block inside this project's `<!-- prune -->` section."""
    text = RESULTS.read_text() if RESULTS.exists() else ""
    m = re.search(r"<!-- prune -->\n(.*?)\n?<!-- /prune -->", text, flags=re.S)
    section = m.group(1) if m else ""
    start, end = f"<!-- prune:{sub} -->", f"<!-- /prune:{sub} -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in section:
        section = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, section, flags=re.S)
    else:
        section = (section.rstrip() + "\n\n" + block).strip()
    write_section("prune", section)


def timed_shell(cmd: str) -> float:
    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    subprocess.run(["bash", "-c", cmd], check=True)
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - t0


def bench_prune(args) -> str:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_prune_"))
    hf, mg, out, copy = work / "hf", work / "mg", work / "out", work / "copy"
    cfg = hf_config("7b", args.layers)
    layers = cfg["num_hidden_layers"]
    target = list(TARGET)
    if args.layers:  # keep the drop list valid for fewer layers: drop the last layer ids instead
        target[-1] = ",".join(str(i) for i in range(layers - max(1, layers // 8), layers))
    try:
        print(f"writing synthetic 7b-shaped checkpoint ({layers} layers) and converting to TP={args.tp} ...",
              flush=True)
        write_synthetic_hf(hf, cfg)
        subprocess.run(python_cmd("convert", "hf-to-megatron", "--hf-dir", str(hf), "--save", str(mg), "--tp",
                                  str(args.tp), "--no-progress"), check=True)
        cleanup(hf)
        read_bytes = dir_bytes(mg)
        shard = max(p.stat().st_size for p in mg.rglob("model_optim_rng.pt"))
        t_read = timed_shell(f"cat {mg}/release/*/model_optim_rng.pt > /dev/null")
        t_copy_in = timed_shell(f"cp -r {mg} {copy}")
        cleanup(copy)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.tp}", "-m",
               "megatron_prune", "prune", "--load", str(mg), "--save", str(out), "--importance", "random",
               "--no-progress", "--json", *target]
        wall, run = timed_json(cmd)
        written = dir_bytes(out)
        t_write = timed_shell(f"cp -r {out} {copy}")
    finally:
        cleanup(hf, mg, out, copy)
        if not args.workdir:
            cleanup(work)
    return _render_bench(args, layers, run["target"], read_bytes, written, shard, t_read, t_copy_in, t_write,
                         wall, run)


def timed_json(cmd: list[str]) -> tuple[float, dict]:
    """(wall seconds incl. a final sync, the pruner's --json line: per-rank peak RSS and in-process seconds)."""
    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    subprocess.run(["sync"], check=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{proc.stderr[-4000:]}")
    return wall, json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def _render_bench(args, layers, shape, read_bytes, written, shard, t_read, t_copy_in, t_write, wall, run) -> str:
    baseline = t_read + t_write
    rss = max(run["peak_rss"])
    rss_target = 1.3 * shard + 0.5 * 2**30
    met = lambda ok: "(met)" if ok else "(NOT met)"  # noqa: E731
    return f"""## Pruning: 7b shape ({layers} layers, bf16, TP={args.tp}) -> {shape['num_layers']} layers, hidden {shape['hidden_size']}, FFN {shape['ffn_hidden_size']}, {shape['num_attention_heads']} heads, random plan

Command: `python benchmarks/bench_prune.py{' --layers ' + str(args.layers) if args.layers else ''}` on this project's CPU machine (2 cores shared with other jobs; {args.tp} processes).
Warm page cache (the input was just written). Baseline "plain copy of the bytes read and written" = `cat` of
every input shard to /dev/null + `cp -r` of the pruned output (+ sync each).

| metric | value | target |
|---|---|---|
| bytes read (input shards) | {gib(read_bytes)} | |
| bytes written (pruned shards) | {gib(written)} | |
| read input (`cat` > /dev/null) | {t_read:.1f} s | |
| copy output (`cp -r` + sync) | {t_write:.1f} s | |
| plain copy of the input (`cp -r` + sync), for reference | {t_copy_in:.1f} s | |
| prune wall time (torchrun, {args.tp} process starts, + sync) | {wall:.1f} s | |
| ratio wall / (read + write copy) | {wall / baseline:.2f}x | <= 2x {met(wall <= 2 * baseline)} |
| in-process time per rank: plan / apply / total | {run['seconds']['plan']:.1f} / {run['seconds']['apply']:.1f} / {run['seconds']['total']:.1f} s | |
| largest input shard | {gib(shard)} | |
| peak RSS per rank (getrusage, max over ranks) | {gib(rss)} | <= {gib(rss_target)} {met(rss <= rss_target)} |
"""


# ----------------------------------------------------------------------------- scoring pass vs plain forward
def score_timing(payload: dict) -> dict:
    """On every rank (run_distributed): plain forward vs forward with ActivationScorer hooks, same tokens."""
    import torch

    from megatron_prune.config.shape import LlamaShape
    from megatron_prune.model.build import ModelOptions, build_model
    from megatron_prune.model.dist import init_model_parallel
    from megatron_prune.model.forward import forward_batches
    from megatron_prune.prune.importance import ActivationScorer

    torch.set_num_threads(1)
    shape = LlamaShape(**payload["shape"])
    info = init_model_parallel(payload["tp"], 1)
    model = build_model(shape, ModelOptions(tp=payload["tp"], padded_vocab_size=shape.vocab_size, init_weights=True,
                                            seq_length=payload["seq"]))
    model.eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, shape.vocab_size, (payload["batch"], payload["seq"] + 1), generator=g)
               for _ in range(payload["batches"])]
    out = {"plain": [], "scored": [], "plain_cpu": [], "scored_cpu": [], "rank": info.rank}

    def timed(kind: str, fn) -> None:
        torch.distributed.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        out[kind].append(time.perf_counter() - t0)
        out[kind + "_cpu"].append(time.process_time() - c0)

    def scored() -> None:
        with ActivationScorer(model, shape) as scorer:
            forward_batches(model, batches, shape.vocab_size)
        scorer.scores()  # local part only: the gathers are a one-off, not per token

    for _ in range(payload["repeats"]):  # alternate, keep the best of each: the machine is shared
        timed("plain", lambda: forward_batches(model, batches, shape.vocab_size))
        timed("scored", scored)
    return out


NOISE = ("\nThe 2 cores are shared with other jobs: run-to-run spread is larger than the hooks' cost, so a ratio "
         "below 1 means\n\"no measurable overhead at this size\", not a speed-up.\n")


def bench_scoring(args) -> str:
    from megatron_prune.testing import run_distributed

    shape = dict(num_layers=8, hidden_size=1024, ffn_hidden_size=2816, num_attention_heads=16, num_query_groups=16,
                 kv_channels=64, vocab_size=32000)
    payload = {"shape": shape, "tp": args.tp_scoring, "seq": 256, "batch": 4, "batches": 4, "repeats": 5}
    res = run_distributed(args.tp_scoring, "bench_prune:score_timing", payload, timeout=3000,
                          env={"PYTHONPATH": str(Path(__file__).resolve().parent)})
    n = payload["repeats"]
    plain_all = [max(r["plain"][i] for r in res) for i in range(n)]  # slowest rank per run
    scored_all = [max(r["scored"][i] for r in res) for i in range(n)]
    plain, scored = min(plain_all), min(scored_all)
    plain_cpu = min(sum(r["plain_cpu"][i] for r in res) for i in range(n))  # CPU seconds of all ranks
    scored_cpu = min(sum(r["scored_cpu"][i] for r in res) for i in range(n))
    tokens = payload["batch"] * payload["batches"] * payload["seq"]
    ok = "(met)" if scored <= 1.1 * plain else "(NOT met)"
    return f"""## Activation scoring pass vs plain forward (TP={args.tp_scoring}, CPU)

Command: `python benchmarks/bench_prune.py --scoring-only`. Model: random-init {shape['num_layers']} layers, hidden
{shape['hidden_size']}, FFN {shape['ffn_hidden_size']}, {shape['num_attention_heads']} heads, vocab {shape['vocab_size']}, fp32;
{tokens} tokens ({payload['batches']} micro-batches of {payload['batch']} x {payload['seq']}); best of {payload['repeats']} alternating runs.

| metric | value | target |
|---|---|---|
| plain forward (forward_batches) | {plain:.2f} s | |
| forward with ActivationScorer hooks (hidden, heads, FFN, Block Influence) | {scored:.2f} s | |
| ratio (wall) | {scored / plain:.3f}x | <= 1.1x {ok} |
| CPU time of all ranks, plain / scored (less sensitive to other jobs) | {plain_cpu:.2f} / {scored_cpu:.2f} s | |
| ratio (CPU time) | {scored_cpu / plain_cpu:.3f}x | <= 1.1x {"(met)" if scored_cpu <= 1.1 * plain_cpu else "(NOT met)"} |
| every run, plain / scored | {' '.join(f'{t:.2f}' for t in plain_all)} / {' '.join(f'{t:.2f}' for t in scored_all)} s | |
{NOISE if scored < plain else ''}"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=None, help="override the 7b shape's 32 layers (smaller runs)")
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--tp-scoring", type=int, default=2, help="TP size of the scoring-pass timing (default 2)")
    ap.add_argument("--scoring-only", action="store_true")
    ap.add_argument("--skip-scoring", action="store_true")
    ap.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
    ap.add_argument("--no-write", action="store_true", help="print results without updating RESULTS.md")
    args = ap.parse_args()
    blocks = []
    if not args.scoring_only:
        blocks.append(("bench", bench_prune(args)))
    if not args.skip_scoring:
        blocks.append(("scoring", bench_scoring(args)))
    for sub, body in blocks:
        print(body)
        if not args.no_write:
            update_prune_section(sub, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
