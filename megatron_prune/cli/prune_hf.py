"""python -m megatron_prune prune-hf --hf-dir DIR --plan prune_plan.json --save OUT

Applies a saved prune plan (from `prune`) to an HF LLaMA checkpoint in one process. The result loads with
LlamaForCausalLM.from_pretrained and equals the Megatron-pruned checkpoint exported with megatron-to-hf."""

from __future__ import annotations

from megatron_prune.cli.common import add_dtype


def add_arguments(p) -> None:
    p.add_argument("--hf-dir", required=True, help="HF LLaMA directory the plan was made for")
    p.add_argument("--plan", required=True, help="prune_plan.json written by `prune`")
    p.add_argument("--save", required=True, help="output HF directory (must not exist or be empty)")
    add_dtype(p, "the HF config's dtype")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --save")
    p.add_argument("--allow-non-finite", action="store_true",
                   help="copy tensors holding NaN / Inf instead of refusing (checked by default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    import sys

    from megatron_prune.config.shape import hf_config_warning
    from megatron_prune.prune.apply_hf import prune_hf
    from megatron_prune.prune.plan import PrunePlan

    plan = PrunePlan.load(args.plan)
    warning = hf_config_warning(plan.target)
    if warning:
        print(warning, file=sys.stderr)
    shape = prune_hf(args.hf_dir, plan, args.save, dtype=args.dtype, overwrite=args.overwrite,
                     progress=not args.no_progress, plan_path=args.plan,
                     allow_non_finite=args.allow_non_finite)
    print(f"wrote {args.save}: {plan.summary()} dtype={shape.dtype}")
    return 0
