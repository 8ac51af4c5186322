"""The demo as a compress recipe: SmolLM2 (or the self-trained tiny LLaMA) pruned to the plan's shape on the
shipped text, recovered by distillation, exported and evaluated, all by `compress`'s one job (compress/job.py).
`python -m megatron_prune compress --config demo_out/compress/recipe.yaml` runs the same job again."""

from __future__ import annotations

from pathlib import Path

from megatron_prune.compress.recipe import Recipe, build_recipe
from megatron_prune.demo.stages import DemoPlan

SAMPLES = Path(__file__).resolve().parent.parent / "data" / "samples"
EVAL_SEQ_LENGTH = 512  # held-out windows: longer than the training sequences (128)


def demo_recipe(hf_dir: Path, save: Path, plan: DemoPlan, eval_tokens: int) -> Recipe:
    """Convert at plan.tp (fp32), prune to the plan's shape (activation importance on the shipped training text,
    balance mode), reshard to TP=1, distil from the unpruned model with 2 data-parallel processes, export, and
    evaluate the three models on heldout.jsonl (never used for calibration or training)."""
    train = str(SAMPLES / "train.jsonl")
    prune = ["--importance", "activation", "--prune-type", "balance", "--seed", "1234",
             "--calib-samples", str(plan.calib_samples), "--calib-seq-length", "256", *plan.target_args(),
             "--width-multiple", "1"]
    recover = ["--tokenizer", str(hf_dir), "--split", "98,2,0", "--kd-alpha", str(plan.kd_alpha),
               "--kd-temperature", str(plan.kd_temperature), "--lr", str(plan.lr), "--min-lr", str(plan.lr / 10),
               "--lr-warmup-iters", str(max(1, plan.train_iters // 10)), "--log-interval", "2",
               "--eval-interval", "0", "--eval-iters", str(plan.eval_iters), "--seed", str(plan.seed), "--fp32"]
    settings = {"hf_dir": str(hf_dir), "save": str(save), "tp": plan.tp, "train_tp": 1, "nproc": 2,
                "calib_data": train, "train_data": [train], "eval_data": str(SAMPLES / "heldout.jsonl"),
                "train_iters": plan.train_iters, "seq_length": plan.seq_length,
                "global_batch_size": plan.global_batch, "micro_batch_size": plan.global_batch // 2,
                "eval_max_tokens": eval_tokens, "convert_args": ["--dtype", "fp32"], "prune_args": prune,
                "train_args": recover, "eval_args": ["--seq-length", str(EVAL_SEQ_LENGTH), "--tokenizer", str(hf_dir)]}
    return build_recipe(settings, {}, source="the demo's recipe")
