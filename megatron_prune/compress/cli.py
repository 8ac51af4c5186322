"""python -m megatron_prune compress --hf-dir HF --save OUT --target-params 50% --train-data FILE_OR_PREFIX...
   --eval-data FILE --train-iters N --seq-length L --global-batch-size B [--steps K] [--config recipe.yaml]

One resumable job from an HF LLaMA model to a smaller, recovered one: convert (TP) -> prune to the budget ->
reshard to the training TP when it differs -> distillation from the unpruned model -> export to HF -> held-out
evaluation of the original, pruned and recovered models. Each stage is the CLI command a user would type; its
output goes to OUT/stages/NN-name/. Running the same command again continues from the first stage that is not
done (training from its last checkpoint); a changed setting redoes its stage and the ones after it.
Every flag can come from --config (YAML or JSON, keys with dashes or underscores); the command line wins; the
resolved recipe is written to OUT/recipe.yaml. Options of one stage pass through with --STAGE-args "...".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


OPTIONS: dict[str, tuple[dict, str]] = {
    "hf-dir": ({}, "HF LLaMA directory (config.json, weights, tokenizer) [required]"),
    "save": ({}, "job directory: stages/, hf/, report.json, report.md, recipe.yaml, loss.png [required]"),
    "target-params": ({}, "parameters to keep: a count (6.4e7) or a share of the source's (50%%)"),
    "target-memory-gb": ({}, "GiB of bf16 weights + KV cache (see `prune --help`)"),
    "tp": ({"type": int}, "tensor-parallel size of conversion and pruning (default 1)"),
    "train-tp": ({"type": int}, "tensor-parallel size of training and evaluation (default: --tp)"),
    "calib-data": ({}, "calibration text / jsonl / indexed prefix of the pruner (default: the shipped sample)"),
    "train-data": ({"nargs": "+"}, "training text / jsonl files (tokenized by a preprocess stage) or indexed "
                                   "dataset prefixes [required]"),
    "eval-data": ({}, "held-out text / jsonl on which every model is evaluated [required]"),
    "train-iters": ({"type": int}, "training iterations in all (split over --steps rounds) [required]"),
    "seq-length": ({"type": int}, "tokens per training and evaluation sequence [required]"),
    "global-batch-size": ({"type": int}, "sequences per training iteration [required]"),
    "micro-batch-size": ({"type": int}, "sequences per micro-batch per data-parallel rank (default: train's)"),
    "steps": ({"type": int}, "prune/recover rounds reaching the budget geometrically (default 1)"),
    "nproc": ({"type": int}, "training processes per node (default: the node's GPUs, else --train-tp)"),
    "eval-max-tokens": ({"type": int}, "evaluate at most this many held-out tokens (default: all)"),
}
STAGE_ARGS = ("convert", "preprocess", "prune", "reshard", "train", "export", "eval")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML or JSON recipe of these settings (command line wins)")
    for name, (kw, text) in OPTIONS.items():
        p.add_argument(f"--{name}", default=None, help=text, **kw)
    for stage in STAGE_ARGS:
        p.add_argument(f"--{stage}-args", default=None, metavar="'ARGS'",
                       help=f"more options of the {stage} stage's command, one quoted string (see "
                            f"`python -m megatron_prune {'convert' if stage in ('convert', 'export') else stage} "
                            f"--help`)")


def run(args: argparse.Namespace) -> int:
    from megatron_prune.compress.recipe import build_recipe
    from megatron_prune.train.config import read_config_file

    file_values = read_config_file(args.config) if args.config else {}
    recipe = build_recipe(file_values, vars(args), source=args.config or "arguments")
    return compress(recipe)


def compress(recipe) -> int:
    from megatron_prune.compress.job import run_job, say

    _, report = run_job(recipe)
    say("; ".join(f"{k}: {m['params']:,} params, held-out loss {m['loss']:.4f} (ppl {m['perplexity']:.2f})"
                  for k, m in report["models"].items()))
    print(f"wrote {Path(recipe.save) / 'hf'} and {Path(recipe.save) / 'report.md'}", file=sys.stderr)
    return 0
