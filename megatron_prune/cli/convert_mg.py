"""python -m megatron_prune convert megatron-to-hf --load DIR --save DIR [--dtype ...]"""

from __future__ import annotations

import sys

from megatron_prune.cli.common import add_dtype


def add_arguments(p) -> None:
    p.add_argument("--load", required=True, help="Megatron checkpoint directory (any TP/PP, even or uneven shards)")
    p.add_argument("--save", required=True, help="output HF directory (must not exist or be empty)")
    add_dtype(p, "the checkpoint's dtype")
    p.add_argument("--max-shard-size-gb", type=float, default=5.0, help="safetensors shard size (default 5)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --save")
    p.add_argument("--allow-non-finite", action="store_true",
                   help="copy tensors holding NaN / Inf instead of refusing (checked by default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from megatron_prune.checkpoint.convert_files import megatron_to_hf
    from megatron_prune.config.shape import hf_config_warning

    meta = megatron_to_hf(args.load, args.save, dtype=args.dtype, overwrite=args.overwrite,
                          progress=not args.no_progress, max_shard_bytes=int(args.max_shard_size_gb * 2**30),
                          allow_non_finite=args.allow_non_finite)
    print(f"wrote {args.save}: HF LlamaForCausalLM, {meta.shape.num_params():,} parameters, "
          f"from tp={meta.tp} pp={meta.pp}")
    warning = hf_config_warning(meta.shape)  # a --megatron-only-shapes pick: correct files, one loader refuses them
    if warning:
        print(warning, file=sys.stderr)
    return 0
