"""python -m megatron_prune convert hf-to-megatron --hf-dir DIR --save DIR --tp N [--pp M] ..."""

from __future__ import annotations

from megatron_prune.cli.common import add_dtype


def add_arguments(p) -> None:
    p.add_argument("--hf-dir", required=True, help="HF LLaMA directory (config.json + *.safetensors or *.bin)")
    p.add_argument("--save", required=True, help="output Megatron checkpoint directory (must not exist or be empty)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    add_dtype(p, "the HF config's dtype")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the vocabulary to a multiple of this x TP, as Megatron-LM does (default 128)")
    p.add_argument("--te-names", action="store_true",
                   help="write Transformer Engine key names (norms fused into linear_qkv / linear_fc1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --save")
    p.add_argument("--allow-non-finite", action="store_true",
                   help="copy tensors holding NaN / Inf instead of refusing (checked by default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from megatron_prune.checkpoint.convert_files import hf_to_megatron

    meta = hf_to_megatron(args.hf_dir, args.save, tp=args.tp, pp=args.pp, dtype=args.dtype,
                          divisible_by=args.make_vocab_size_divisible_by, te_names=args.te_names,
                          overwrite=args.overwrite, progress=not args.no_progress,
                          allow_non_finite=args.allow_non_finite)
    s = meta.shape
    print(f"wrote {args.save}: tp={meta.tp} pp={meta.pp} dtype={s.dtype} layers={s.num_layers} "
          f"hidden={s.hidden_size} heads={s.num_attention_heads}/{s.num_query_groups} ffn={s.ffn_hidden_size} "
          f"vocab={s.vocab_size} (padded {meta.padded_vocab_size}) params={s.num_params():,}")
    return 0
