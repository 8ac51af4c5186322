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

from megatron_prune.errors import UserError

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
    from megatron_prune.checkpoint.lock import output_lock
    from megatron_prune.compress.checks import check_job, source_shape, train_data_kinds
    from megatron_prune.compress.job import run_stages, say
    from megatron_prune.compress.plan import build_stages
    from megatron_prune.compress.recipe import write_recipe
    from megatron_prune.compress.runner import StageError

    stages = build_stages(recipe, source_shape(recipe.hf_dir).num_params(), train_data_kinds(recipe))
    check_job(recipe, stages)
    out = Path(recipe.save)
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out, inside=True):
        write_recipe(recipe, out / "recipe.yaml")
        try:
            records = run_stages(stages, out)
        except StageError as e:
            first = str(e).splitlines()[0]
            raise UserError(f"{first} (its output is above; rerun the same command to continue)") from None
        report = _finish(records, out)
    models = report["models"]
    say("; ".join(f"{k}: {m['params']:,} params, held-out loss {m['loss']:.4f} (ppl {m['perplexity']:.2f})"
                  for k, m in models.items()))
    print(f"wrote {out / 'hf'} and {out / 'report.md'}", file=sys.stderr)
    return 0


def _finish(records: list[dict], out: Path) -> dict:
    from megatron_prune.compress.report import build_report, metrics_files, write_report
    from megatron_prune.compress.runner import StageError, cli_command, run_command

    report = build_report(records, out)
    png = out / "loss.png"
    try:
        run_command(cli_command(["plot", *metrics_files(records), "--out", str(png), "--title", "recovery"]))
        report["loss_png"] = str(png)
    except StageError as e:  # no matplotlib: the report without the picture
        print(f"warning: no loss.png: {str(e).splitlines()[-1]}", file=sys.stderr)
    write_report(report, out)
    return report
