"""Quality report: which pruning choices matter once the pruned model is trained again, on a real model.

    python benchmarks/quality_report.py              # SmolLM2-135M, 60 recovery iterations per variant (~45 min)
    python benchmarks/quality_report.py --iters 12   # shorter

All variants share the demo's pruned shape (30 -> 20 layers, hidden 576 -> 480, heads 9 -> 6 in 3 groups,
FFN 1536 -> 1020; 134.5M -> 64.0M parameters) and the same recovery recipe and token budget (the demo's:
2 data-parallel ranks, global batch 8 x 128 tokens, AdamW lr 5e-4 cosine to 5e-5, fp32):
  (a) importance: random vs magnitude vs activation, right after pruning and after distillation;
  (b) recovery loss: LM loss vs distillation from the unpruned teacher (activation-pruned start);
  (c) initialisation: the activation-pruned weights vs the same shape initialised at random (std 0.02).
Calibration and training use the shipped train.jsonl; perplexity is measured on heldout.jsonl (shares no text).
The KD and LM rows run with two training seeds (data order), so their difference is shown beside its spread.
Every step is the CLI a user runs (the demo's stages, with the demo's deterministic thread settings). Writes
docs/quality_report.md, docs/quality_recovery.png and the quality section of benchmarks/RESULTS.md (between
`<!-- quality-report -->` markers).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from megatron_prune.demo import stages
from megatron_prune.demo.pipeline import run_cli
from common import recovery_parser  # benchmarks/ is the script's directory

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "megatron_prune" / "data" / "samples"
CACHE = Path.home() / ".cache" / "megatron_prune"
REPORT, PLOT = REPO / "docs" / "quality_report.md", REPO / "docs" / "quality_recovery.png"
RESULTS = REPO / "benchmarks" / "RESULTS.md"
SEEDS = (1234, 4321)  # training seeds (data order) of the rows whose difference the report is about
# (label, pruned start, teacher for recovery: True = KD from the unpruned model, False = LM loss, seeds)
RECOVERIES = [("activation + KD", "activation", True, SEEDS), ("magnitude + KD", "magnitude", True, SEEDS[:1]),
              ("random + KD", "random", True, SEEDS[:1]), ("activation + LM loss", "activation", False, SEEDS),
              ("random init (scratch) + KD", "scratch", True, SEEDS[:1])]


def log_step(msg: str) -> None:
    print(f"[quality] {msg}", flush=True)


def pruned_start(work: Path, teacher: Path, plan: stages.DemoPlan, importance: str, tokens: int, log: Path) -> dict:
    """Prune the teacher (TP=3) by `importance`, evaluate, reshard to TP=1 (reused when already in `work`).
    magnitude has no layer scores, so it drops the layers activation's Block Influence dropped: (a) then compares
    width criteria at equal depth choice."""
    t0 = time.perf_counter()
    tp3, tp1 = work / f"{importance}-tp3", work / f"{importance}-tp1"
    if not tp1.is_dir():
        dropped = None
        if importance == "magnitude":
            dropped = json.loads((work / "activation-tp3" / "prune_plan.json").read_text())["dropped_layers"]
        stages.prune(teacher, tp3, plan, SAMPLES / "train.jsonl", log, importance, dropped)
        stages.reshard(tp3, tp1, 1, log)
    res = stages.evaluate(tp3, SAMPLES / "heldout.jsonl", tokens, plan.tp, log)
    log_step(f"{importance}: ppl {res['perplexity']:.2f} right after pruning ({time.perf_counter() - t0:.0f} s)")
    return {"ckpt": tp1, "pruned": res}


def pruned_starts(work: Path, teacher: Path, plan: stages.DemoPlan, tokens: int, log: Path) -> dict:
    starts = {importance: pruned_start(work, teacher, plan, importance, tokens, log)
              for importance in ("activation", "magnitude", "random")}
    starts["scratch"] = {"ckpt": scratch_checkpoint(work, work / "activation-tp1", log)}
    starts["scratch"]["pruned"] = stages.evaluate(starts["scratch"]["ckpt"], SAMPLES / "heldout.jsonl", tokens, 2,
                                                  log)
    return starts


def scratch_checkpoint(work: Path, like: Path, log: Path) -> Path:
    """A TP=1 checkpoint of the pruned shape with transformers' random initialisation (std 0.02, seed 0)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shaped, hf = work / "shape-hf", work / "scratch-hf"
    if (work / "scratch-tp1").is_dir():
        return work / "scratch-tp1"
    run_cli(["convert", "megatron-to-hf", "--load", str(like), "--save", str(shaped), "--no-progress"], log=log)
    shutil.copytree(shaped, hf, ignore=shutil.ignore_patterns("*.safetensors*", "*.bin"))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig.from_pretrained(shaped)).save_pretrained(hf)
    run_cli(["convert", "hf-to-megatron", "--hf-dir", str(hf), "--save", str(work / "scratch-tp1"), "--tp", "1",
             "--dtype", "fp32", "--no-progress"], log=log)
    return work / "scratch-tp1"


def prepare(work: Path, plan: stages.DemoPlan, eval_tokens: int, log: Path) -> dict:
    """SmolLM2 as the teacher (TP=3 converted and evaluated, resharded to TP=1) and the tokenized training text."""
    from megatron_prune.demo.model_source import fetch_smollm2

    hf = fetch_smollm2(CACHE / "smollm2-135m-hf", CACHE)
    if not (work / "teacher-tp3").is_dir():
        run_cli(["convert", "hf-to-megatron", "--hf-dir", str(hf), "--save", str(work / "teacher-tp3"), "--tp", "3",
                 "--dtype", "fp32", "--no-progress"], log=log)
    teacher = stages.evaluate(work / "teacher-tp3", SAMPLES / "heldout.jsonl", eval_tokens, 3, log)
    log_step(f"teacher: ppl {teacher['perplexity']:.2f}")
    if not (work / "teacher-tp1").is_dir():
        stages.reshard(work / "teacher-tp3", work / "teacher-tp1", 1, log)
    data = stages.preprocess(SAMPLES / "train.jsonl", hf, work / "data" / "train", log)
    return {"hf": hf, "teacher": teacher, "data": data}


def recover(work: Path, base: dict, start: dict, label: str, kd: bool, plan: stages.DemoPlan, eval_tokens: int,
            log: Path) -> dict:
    """One recovery run from `start` with `plan`'s recipe, then held-out perplexity (megatron-core, 2 ranks).
    A finished run of the same start and recipe in `work` (this report's or kd_sweep.py's) is reused."""
    out = work / "runs" / run_name(start["ckpt"].name, kd, plan)
    done = out / "recovery.json"
    if not done.is_file():
        t0 = time.perf_counter()
        stages.train(start["ckpt"], work / "teacher-tp1" if kd else None, base["data"], base["hf"], out, plan, log)
        done.write_text(json.dumps({"train_seconds": time.perf_counter() - t0}))
    seconds = json.loads(done.read_text())["train_seconds"]
    res = stages.evaluate(out, SAMPLES / "heldout.jsonl", eval_tokens, 2, log, base["hf"])
    log_step(f"{label} (seed {plan.seed}): ppl {start['pruned']['perplexity']:.2f} -> {res['perplexity']:.2f} "
             f"({seconds:.0f} s training)")
    return {"label": label, "seed": plan.seed, "kd": kd, "before": start["pruned"], "after": res,
            "seconds": seconds, "metrics": str(out / "metrics.jsonl")}


def run_name(start: str, kd: bool, plan: stages.DemoPlan) -> str:
    """Everything that decides a recovery run's weights (not its evaluation)."""
    loss = f"kd-T{plan.kd_temperature:g}-a{plan.kd_alpha:g}" if kd else "lm"
    return f"{start}-{loss}-lr{plan.lr:g}-it{plan.train_iters}-gbs{plan.global_batch}-seed{plan.seed}"


def run_report(args, work: Path) -> tuple[str, dict]:
    log = work / "report.log"
    plan = stages.DemoPlan(train_iters=args.iters, calib_samples=args.calib_samples, eval_iters=0)
    base = prepare(work, plan, args.eval_tokens, log)
    starts = pruned_starts(work, work / "teacher-tp3", plan, args.eval_tokens, log)
    results = {"teacher": base["teacher"],
               "params": stages.param_counts(work / "teacher-tp3", work / "activation-tp3"),
               "plan": {"iters": plan.train_iters, "tokens": plan.train_iters * plan.global_batch * plan.seq_length,
                        "kd_temperature": plan.kd_temperature, "kd_alpha": plan.kd_alpha},
               "runs": []}
    for label, start, kd, seeds in RECOVERIES:
        for seed in seeds:
            results["runs"].append(recover(work, base, starts[start], label, kd, dataclasses.replace(plan, seed=seed),
                                           args.eval_tokens, log))
    return render(results, args), results


def summarise(runs: list[dict]) -> dict:
    """Mean held-out loss over a variant's seeds, its perplexity, and the spread (max - min) of both."""
    losses = [r["after"]["loss"] for r in runs]
    ppls = [r["after"]["perplexity"] for r in runs]
    return {"loss": statistics.fmean(losses), "ppl": math.exp(statistics.fmean(losses)), "ppls": ppls,
            "seeds": [r["seed"] for r in runs], "loss_spread": max(losses) - min(losses),
            "ppl_spread": max(ppls) - min(ppls)}


def render(r: dict, args) -> str:
    p = r["params"]
    by_label: dict[str, list[dict]] = {}
    for x in r["runs"]:
        by_label.setdefault(x["label"], []).append(x)
    ppl = lambda v: f"{v:,.2f}"  # noqa: E731

    def table(labels):
        rows = ["| variant | right after pruning | after recovery | per seed | held-out loss after |",
                "|---|---:|---:|---|---:|"]
        for lab in labels:
            s = summarise(by_label[lab])
            seeds = ", ".join(f"{seed}: {v:,.2f}" for seed, v in zip(s["seeds"], s["ppls"]))
            spread = f" (spread {s['loss_spread']:.4f})" if len(s["seeds"]) > 1 else ""
            rows.append(f"| {lab} | {ppl(by_label[lab][0]['before']['perplexity'])} | **{ppl(s['ppl'])}** | {seeds} | "
                        f"{s['loss']:.4f}{spread} |")
        return "\n".join(rows)

    kd, lm = summarise(by_label["activation + KD"]), summarise(by_label["activation + LM loss"])
    gap = lm["loss"] - kd["loss"]
    return "\n".join([
        f"Command: `python benchmarks/quality_report.py --iters {args.iters}` (2-core CPU). SmolLM2-135M-Instruct "
        f"(held-out perplexity **{ppl(r['teacher']['perplexity'])}**, {p['params_before']:,} parameters) pruned to the "
        f"demo's shape ({p['params_after']:,} parameters: 20 layers, hidden 480, 6 heads / 3 groups, FFN 1020). "
        f"Each recovery run: {r['plan']['iters']} iterations = {r['plan']['tokens']:,} tokens of the shipped "
        f"train.jsonl, identical recipe (KD: temperature {r['plan']['kd_temperature']:g}, alpha "
        f"{r['plan']['kd_alpha']:g}); perplexity on {r['teacher']['tokens']:,} tokens of heldout.jsonl (never used for "
        f"calibration or training). Training seeds (data order): {' and '.join(map(str, SEEDS))} for the KD and "
        "LM rows, the first alone for the others; 'after recovery' is the mean over the seeds' held-out losses, "
        "as a perplexity.",
        "", "(a) importance criterion (recovery: distillation)", "",
        table(["activation + KD", "magnitude + KD", "random + KD"]),
        "", "magnitude has no layer scores, so it drops the same 10 layers as activation's Block Influence; "
        "random drops random layers.",
        "", "(b) recovery loss (start: activation-pruned)", "",
        table(["activation + KD", "activation + LM loss"]),
        "", f"Distillation beats the LM loss by {gap:.4f} in held-out loss (mean over {len(kd['seeds'])} seeds); "
        f"the spread between seeds is {kd['loss_spread']:.4f} (KD) and {lm['loss_spread']:.4f} (LM).",
        "", "(c) initialisation at the same shape (recovery: distillation)", "",
        table(["activation + KD", "random init (scratch) + KD"]),
        "", "![recovery loss curves](docs/quality_recovery.png)"])


def write_outputs(body: str, results: dict) -> None:
    run_cli(["plot", *[x["metrics"] for x in results["runs"]],
             "--labels", *[f"{x['label']} (seed {x['seed']})" for x in results["runs"]],
             "--out", str(PLOT), "--title", "recovery at the demo's pruned shape (train LM loss)"])
    REPORT.write_text("# Quality report: pruning and recovery choices on SmolLM2-135M\n\n" + body.replace(
        "docs/quality_recovery.png", "quality_recovery.png") + "\n\nRaw results:\n\n```json\n" + json.dumps(
        {**results, "runs": [{k: v for k, v in x.items() if k != "metrics"} for x in results["runs"]]},
        indent=1) + "\n```\n")
    text = RESULTS.read_text()
    start, end = "<!-- quality-report -->", "<!-- /quality-report -->"
    block = f"{start}\n{body.replace('](docs/', '](../docs/')}\n{end}"  # links relative to benchmarks/
    if start not in text:
        raise SystemExit(f"{RESULTS} has no {start} marker; the report is in {REPORT}")
    RESULTS.write_text(re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S))


def main() -> int:
    ap = recovery_parser(__doc__, "recovery iterations per variant (default 60, as in docs/quality_report.md)")
    ap.add_argument("--calib-samples", type=int, default=32, help="activation calibration samples (default 32)")
    args = ap.parse_args()
    body, results = in_work(args.work, "quality_", lambda work: run_report(args, work))
    print(body)
    if not args.no_write:
        write_outputs(body, results)
    return 0


def in_work(work_arg: str | None, prefix: str, fn):
    """fn(work directory): `work_arg` (kept) or a temporary directory (removed afterwards)."""
    work = Path(work_arg or tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return fn(work)
    finally:
        if work_arg is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
