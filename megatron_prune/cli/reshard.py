"""python -m megatron_prune reshard --load DIR --save DIR --tp N [--pp M]"""

from __future__ import annotations

import sys


def add_arguments(p) -> None:
    p.description = ("Change the TP/PP size of a Megatron checkpoint (converted, pruned - even or uneven "
                     "global-mode shards - or trained). Bit-exact; one output rank at a time; the output is a "
                     "'release' checkpoint. Optimizer, scheduler and RNG state of a training checkpoint are "
                     "dropped (weights only).")
    p.add_argument("--load", required=True, help="source Megatron checkpoint (any TP/PP, even or uneven shards)")
    p.add_argument("--save", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--tp", type=int, required=True, help="target tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="target pipeline-parallel size (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --save")
    p.add_argument("--check-finite", action="store_true",
                   help="read the output back and refuse NaN / Inf (off by default: resharding copies bits exactly, "
                        "so it cannot create them, and the read-back costs ~20%% of the run on a 7B checkpoint; "
                        "convert, prune and prune-hf check by default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from megatron_prune.checkpoint.reshard_files import reshard

    meta = reshard(args.load, args.save, args.tp, args.pp, overwrite=args.overwrite, progress=not args.no_progress,
                   check_finite=args.check_finite)
    src = meta.history[-1]
    print(f"wrote {args.save}: tp={meta.tp} pp={meta.pp} (from tp={src['source_tp']} pp={src['source_pp']}"
          f"{', uneven' if src['uneven_source'] else ''}), padded vocab {meta.padded_vocab_size}")
    if src["source_iteration"] != "release":
        print(f"note: {args.load} is a training checkpoint (iteration {src['source_iteration']}): its weights were "
              "resharded; optimizer, scheduler and RNG state were NOT carried over (the output is a 'release' "
              "checkpoint: training from it starts a fresh optimizer)", file=sys.stderr)
    return 0
