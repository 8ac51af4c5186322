"""Distillation recipe sweep: KD temperature 1 vs 2 and alpha 1.0 vs 0.5, at equal tokens, on SmolLM2-135M.

    python benchmarks/kd_sweep.py                 # 4 recovery runs of 60 iterations (~1 h on 2 idle cores)
    python benchmarks/kd_sweep.py --work DIR      # keep (and reuse) the teacher and pruned checkpoints in DIR

The start is the demo's activation-pruned SmolLM2 (30 -> 20 layers, hidden 480, 6 heads / 3 groups, FFN 1020) and
the recovery recipe is the demo's (benchmarks/quality_report.py machinery: 2 data-parallel ranks, global batch
8 x 128 tokens, AdamW lr 1e-3 cosine to 1e-4, fp32, the same training seed, so every variant sees the same
tokens in the same order); only the loss changes: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * LM
loss. The metric is the held-out perplexity (heldout.jsonl, never trained on). Writes one table into
benchmarks/RESULTS.md (between `<!-- kd-sweep -->` markers); the demo's default (stages.DemoPlan) follows the
winner.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from megatron_prune.demo import stages
from common import recovery_parser, write_section  # benchmarks/ is the script's directory
from quality_report import in_work, prepare, pruned_start, recover

VARIANTS = [(1.0, 1.0), (2.0, 1.0), (1.0, 0.5), (2.0, 0.5)]  # (temperature, alpha)


def run(args, work: Path) -> dict:
    log = work / "kd_sweep.log"
    plan = stages.DemoPlan(train_iters=args.iters, eval_iters=4, seed=args.seed)
    base = prepare(work, plan, args.eval_tokens, log)
    start = pruned_start(work, work / "teacher-tp3", plan, "activation", args.eval_tokens, log)
    runs = []
    for temperature, alpha in VARIANTS:
        variant = dataclasses.replace(plan, kd_temperature=temperature, kd_alpha=alpha)
        r = recover(work, base, start, f"KD T={temperature:g} alpha={alpha:g}", True, variant, args.eval_tokens, log)
        final = [json.loads(line) for line in Path(r["metrics"]).read_text().splitlines()][-1]
        runs.append({**r, "temperature": temperature, "alpha": alpha, "validation": final})
    results = {"teacher": base["teacher"], "pruned": start["pruned"], "iters": plan.train_iters,
            "tokens": plan.train_iters * plan.global_batch * plan.seq_length, "seed": plan.seed, "lr": plan.lr,
            "runs": runs}
    (work / "kd_sweep.json").write_text(json.dumps(results, indent=1, default=str))
    return results


def render(r: dict, args) -> str:
    best = min(r["runs"], key=lambda x: x["after"]["loss"])
    rows = ["| temperature | alpha | held-out perplexity after | held-out loss | validation LM loss (teacher "
            f"{r['runs'][0]['validation']['teacher_lm_loss']:.4f}) | time (s) |", "|---:|---:|---:|---:|---:|---:|"]
    for x in r["runs"]:
        mark = "**" if x is best else ""
        rows.append(f"| {x['temperature']:g} | {x['alpha']:g} | {mark}{x['after']['perplexity']:,.2f}{mark} | "
                    f"{x['after']['loss']:.4f} | {x['validation']['student_lm_loss']:.4f} | {x['seconds']:.0f} |")
    return "\n".join([
        "## Distillation recipe: temperature and alpha (SmolLM2-135M, the demo's pruned shape)", "",
        f"Command: `python benchmarks/kd_sweep.py --iters {r['iters']}` (2-core CPU, shared). Start: the demo's "
        f"activation-pruned SmolLM2 (held-out perplexity {r['pruned']['perplexity']:,.2f}; teacher "
        f"{r['teacher']['perplexity']:.2f}). Each run: {r['iters']} iterations = {r['tokens']:,} tokens of the shipped "
        f"train.jsonl in the same order (seed {r['seed']}), the demo's recipe (AdamW lr {r['lr']:g} cosine to "
        f"{r['lr'] / 10:g}, warmup {max(1, r['iters'] // 10)}, global batch 8 x 128, fp32, 2 ranks); "
        "loss = alpha * T^2 * KL(teacher || "
        "student at temperature T) + (1 - alpha) * LM loss. Held-out: "
        f"{r['teacher']['tokens']:,} tokens of heldout.jsonl; validation: the last 2% of train.jsonl, 4 batches. "
        "One seed per variant: for the seed-to-seed spread of this recipe see the quality report above. "
        "time (s): training and held-out evaluation, on a machine shared with other jobs.", "",
        *rows, "",
        f"Best: temperature {best['temperature']:g}, alpha {best['alpha']:g} - the demo's default "
        "(megatron_prune/demo/stages.py DemoPlan)."])


def main() -> int:
    ap = recovery_parser(__doc__, "recovery iterations per variant (default 60, the demo's)")
    ap.add_argument("--seed", type=int, default=1234, help="training seed, the same for every variant")
    args = ap.parse_args()
    results = in_work(args.work, "kd_sweep_", lambda work: run(args, work))
    body = render(results, args)
    print(body)
    if not args.no_write:
        write_section("kd-sweep", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
