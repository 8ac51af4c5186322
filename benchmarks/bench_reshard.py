"""Benchmark: reshard a LLaMA-2-7B-shaped synthetic bf16 checkpoint TP=8 -> TP=2, beside a plain copy.

    python benchmarks/bench_reshard.py               # full 7B shape (~12.6 GiB; needs ~40 GB of free disk)
    python benchmarks/bench_reshard.py --layers 4    # smaller, same tensor shapes

The TP=8 source is generated directly (random bf16 slices through the converter's own split functions; no HF
copy on disk). Each round times `cp -r` of the source (+ sync) and then `python -m megatron_prune reshard`
(+ sync) under /usr/bin/time -v for peak RSS; rounds alternate so both see the same machine load.
Targets (issue 4): wall time <= 1.5x the plain copy; peak RSS <= 1.3x the largest output shard + 0.5 GiB.
Results go to benchmarks/RESULTS.md (section "reshard") unless --no-write.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (cleanup, dir_bytes, gib, hf_config, largest_file, layer_tensors, plain_copy,  # noqa: E402
                    python_cmd, synthetic_parser, timed, write_section)


class RandomTensor:
    """A full HF tensor that exists only as the slices asked for (random bf16): no full-size allocation.
    Vectors (norms, replicated on every TP rank) are the same on every read."""

    def __init__(self, shape: tuple[int, ...], gen: torch.Generator, seed: int):
        self.shape, self.dtype, self._gen, self._seed = tuple(shape), torch.bfloat16, gen, seed

    def __getitem__(self, idx) -> torch.Tensor:
        if len(self.shape) == 1:
            gen = torch.Generator().manual_seed(self._seed)
            return torch.randn(self.shape, generator=gen, dtype=torch.bfloat16)[idx]
        shape = torch.empty(self.shape, device="meta")[idx].shape
        return torch.randn(shape, generator=self._gen, dtype=torch.bfloat16)


def write_synthetic_megatron(out: Path, cfg: dict, tp: int) -> None:
    """A converter-layout checkpoint at TP=`tp`, PP=1, one rank at a time."""
    from megatron_prune.checkpoint import megatron_io as mio
    from megatron_prune.checkpoint.convert import hf_to_megatron_rank
    from megatron_prune.config.shape import LlamaShape

    shape = LlamaShape.from_hf_config(cfg)
    v, h = cfg["vocab_size"], cfg["hidden_size"]
    hf_shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(cfg["num_hidden_layers"]):
        hf_shapes.update(layer_tensors(cfg, i))
    gen = torch.Generator().manual_seed(0)
    seeds = {k: i for i, k in enumerate(hf_shapes)}
    meta = mio.CheckpointMeta(shape=shape, tp=tp, pp=1, padded_vocab_size=shape.padded_vocab(128, tp),
                              hf_config=cfg).with_history("synthetic", tp=tp)
    args = mio.megatron_args(meta)
    for rank in range(tp):
        sd = hf_to_megatron_rank(lambda k: RandomTensor(hf_shapes[k], gen, seeds[k]), shape, tp, 1, rank, 0,
                                 meta.padded_vocab_size)
        mio.save_rank(out, "release", rank, 0, 1, mio.rank_state(sd, args, 0))
        del sd
    mio.write_meta(out, meta)
    mio.write_tracker(out, "release")


def spot_check(src: Path, out: Path, ratio: int) -> None:
    """Output rank 0, layer 0: qkv rows and linear_fc2 columns are source ranks 0..ratio-1 side by side (MHA)."""
    def model(root: Path, rank: int) -> dict:
        path = root / f"release/mp_rank_{rank:02d}/model_optim_rng.pt"
        return torch.load(path, mmap=True, weights_only=False)["model"]

    got, srcs = model(out, 0), [model(src, r) for r in range(ratio)]
    layer = "decoder.layers.0."
    for key, dim in ((layer + "self_attention.linear_qkv.weight", 0), (layer + "mlp.linear_fc2.weight", 1)):
        if not torch.equal(got[key], torch.cat([s[key] for s in srcs], dim=dim)):
            raise SystemExit(f"spot check failed: {key}")


def run_round(src: Path, copy: Path, out: Path, tp: int, src_tp: int) -> dict:
    load0 = os.getloadavg()[0]
    t_copy = plain_copy(src, copy)
    cleanup(copy)
    wall, rss = timed(python_cmd("reshard", "--load", str(src), "--save", str(out), "--tp", str(tp), "--no-progress"))
    r = dict(copy=t_copy, wall=wall, rss=rss, shard=largest_file(out, "model_optim_rng.pt"), written=dir_bytes(out),
             load=(load0, os.getloadavg()[0]))
    spot_check(src, out, src_tp // tp)
    cleanup(out)
    return r


def report(args, cfg: dict, nbytes: int, runs: list[dict]) -> str:
    shard, rss = runs[0]["shard"], max(r["rss"] for r in runs)
    target = 1.3 * shard + 0.5 * 2**30
    ratios = [r["wall"] / r["copy"] for r in runs]
    ratio = statistics.median(ratios)
    rows = "\n".join(f"| {i + 1} | {r['copy']:.1f} s | {r['wall']:.1f} s | {r['wall'] / r['copy']:.2f}x | "
                     f"{gib(r['rss'])} | {r['load'][0]:.1f} / {r['load'][1]:.1f} |" for i, r in enumerate(runs))
    flags = f" --layers {args.layers}" if args.layers else ""
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    layers = cfg["num_hidden_layers"]
    return f"""## Resharding: {args.shape} shape, {layers} layers, bf16, TP={args.src_tp} -> TP={args.tp}

Command: `python benchmarks/bench_reshard.py{flags}` on this project's CPU machine (x86_64, 2 cores shared with
other jobs: the load averages below show how busy it was). Warm page cache as far as RAM allows: the source was
just written (~{gib(nbytes)}) and the machine has {ram / 2**30:.0f} GiB of RAM; the page cache cannot be dropped here.
Rounds alternate `cp -r` (+ sync) and reshard (+ sync; the reshard time includes Python start-up and the torch
import: 2.9-4.4 s in the runs measured on this machine).

| round | plain copy | reshard wall | ratio | peak RSS (/usr/bin/time -v) | load avg before / after |
|---|---|---|---|---|---|
{rows}

| metric | value | target |
|---|---|---|
| bytes read (TP={args.src_tp} checkpoint) | {gib(nbytes)} | |
| bytes written (TP={args.tp} checkpoint) | {gib(runs[0]['written'])} | |
| wall / copy (median of rounds) | {ratio:.2f}x | <= 1.5x {'(met)' if ratio <= 1.5 else '(NOT met)'} |
| largest output shard | {gib(shard)} | |
| peak RSS (max of rounds) | {gib(rss)} | <= {gib(target)} {'(met)' if rss <= target else '(NOT met)'} |

How: row-split tensors (embedding, qkv, fc1, output: {_row_share(cfg):.0%} of the bytes) are copied file to file
with copy_file_range into a skeleton rank file written by torch.save under skip_data; linear_proj and linear_fc2
are gathered ~1 MiB of rows at a time through two reusable buffers. Every round's output passed a spot check
(layer 0 qkv and linear_fc2 equal the concatenated source shards).
"""


def _row_share(cfg: dict) -> float:
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    layer_rows, layer_cols = h * (h + 2 * kv) + 2 * f * h, h * h + h * f
    n = cfg["num_hidden_layers"]
    rows = n * layer_rows + 2 * v * h
    return rows / (rows + n * layer_cols + (2 * n + 1) * h)


def main() -> int:
    ap = synthetic_parser(__doc__, tp=2)
    ap.add_argument("--src-tp", type=int, default=8, help="the source checkpoint's TP size (default 8)")
    ap.add_argument("--rounds", type=int, default=2, help="copy + reshard rounds (default 2)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_reshard_"))
    src, copy, out = work / "src", work / "copy", work / "out"
    cfg = hf_config(args.shape, args.layers)
    try:
        write_synthetic_megatron(src, cfg, args.src_tp)
        nbytes = dir_bytes(src)
        runs = [run_round(src, copy, out, args.tp, args.src_tp) for _ in range(args.rounds)]
    finally:
        cleanup(src, copy, out)
        if not args.workdir:
            cleanup(work)
    body = report(args, cfg, nbytes, runs)
    print(body)
    if not args.no_write:
        write_section("reshard", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
