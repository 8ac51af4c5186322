"""Pruning to a parameter budget on a real model: the search's pick vs the demo's hand-picked shape, what the width
rounding costs, importance methods at the picked shape, and what the search itself costs.

    python benchmarks/budget_search.py                    # SmolLM2-135M-Instruct at TP=3, writes RESULTS.md
    python benchmarks/budget_search.py --recovery-iters 0 # no recovery runs (right after pruning only)

Budget: the demo's hand shape (20 layers, hidden 480, 6 heads / 3 groups, FFN 1020) = 64,047,840 parameters.
Every step is the CLI a user runs (`prune --target-params`, `prune` with sizes, `eval`, `reshard`, `train`).
Calibration: the shipped train.jsonl (the search holds its last --search-eval-samples windows apart to rank
candidates); every number in the tables is measured on heldout.jsonl, which neither pruning nor training sees.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from megatron_prune.demo import stages
from megatron_prune.demo.pipeline import last_json, run_cli

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prune import update_prune_section  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "megatron_prune" / "data" / "samples"
CACHE = Path.home() / ".cache" / "megatron_prune"
RESULTS_JSON = REPO / "benchmarks" / "budget_search.json"
BUDGET = 64_047_840
TP = 3


def log_step(msg: str) -> None:
    print(f"[budget] {msg}", flush=True)


def calib_args(samples: int) -> list[str]:
    return ["--calib-data", str(SAMPLES / "train.jsonl"), "--calib-samples", str(samples), "--calib-seq-length", "256"]


def search(teacher: Path, out: Path, args, multiple: int, log: Path) -> dict:
    t0 = time.perf_counter()
    res = last_json(run_cli(["prune", "--load", str(teacher), "--save", str(out), "--target-params", str(BUDGET),
                             "--importance", "activation", *calib_args(args.calib_samples),
                             "--width-multiple", str(multiple), "--search-candidates", str(args.candidates),
                             "--search-eval-samples", str(args.eval_samples), "--overwrite", "--no-progress",
                             "--json"], nproc=TP, log=log))
    res["wall"] = time.perf_counter() - t0
    return res


def hand(teacher: Path, out: Path, args, log: Path, importance: str = "activation", dropped=None,
         seed: int = 1234, shape: dict | None = None) -> dict:
    """Prune to the demo's shape (or `shape`) with one importance method."""
    plan = stages.DemoPlan(calib_samples=args.calib_samples)
    if shape:
        plan = stages.DemoPlan(calib_samples=args.calib_samples, layers=shape["num_layers"],
                               hidden=shape["hidden_size"], heads=shape["num_attention_heads"],
                               groups=shape["num_query_groups"], ffn=shape["ffn_hidden_size"])
    t0 = time.perf_counter()
    calib = SAMPLES / "train.jsonl"
    if importance == "taylor":  # stages.prune passes calibration arguments for activation only
        res = last_json(run_cli(["prune", "--load", str(teacher), "--save", str(out), "--importance", "taylor",
                                 *calib_args(args.calib_samples), *plan.target_args(dropped), "--overwrite",
                                 "--no-progress", "--json"], nproc=TP, log=log))
    else:
        res = stages.prune(teacher, out, plan, calib, log, importance, dropped, seed)
    res["wall"] = time.perf_counter() - t0
    return res


def evaluate(ckpt: Path, args, log: Path, nproc: int = TP, tokenizer: Path | None = None) -> dict:
    return stages.evaluate(ckpt, SAMPLES / "heldout.jsonl", args.eval_tokens, nproc, log, tokenizer)


def shard_bytes(ckpt: Path) -> int:
    return max(f.stat().st_size for f in ckpt.glob("release/mp_rank_*/model_optim_rng.pt"))


def recover(work: Path, name: str, start: Path, hf: Path, data: str, args, log: Path) -> dict:
    """Equal-token recovery (the demo's recipe: distillation from the unpruned model, 2 DP ranks at TP=1)."""
    stages.reshard(start, work / f"{name}-tp1", 1, log)
    plan = stages.DemoPlan(train_iters=args.recovery_iters, eval_iters=0)
    stages.train(work / f"{name}-tp1", work / "teacher-tp1", data, hf, work / f"{name}-run", plan, log)
    res = evaluate(work / f"{name}-run", args, log, nproc=2, tokenizer=hf)
    res["tokens_trained"] = plan.train_iters * plan.global_batch * plan.seq_length
    return res


def run(args, work: Path) -> dict:
    from megatron_prune.demo.model_source import fetch_smollm2

    log = work / "budget.log"
    hf = fetch_smollm2(CACHE / "smollm2-135m-hf", CACHE)
    teacher = work / "teacher-tp3"
    run_cli(["convert", "hf-to-megatron", "--hf-dir", str(hf), "--save", str(teacher), "--tp", str(TP),
             "--dtype", "fp32", "--no-progress"], log=log)
    r: dict = {"teacher": evaluate(teacher, args, log), "shard_bytes": shard_bytes(teacher), "variants": {}}
    log_step(f"teacher ppl {r['teacher']['perplexity']:.2f}")
    r["hand"] = hand(teacher, work / "hand", args, log)
    r["variants"]["hand shape (demo)"] = evaluate(work / "hand", args, log)
    for multiple in args.multiples:
        name = f"search (width multiple {multiple})"
        r.setdefault("searches", {})[multiple] = search(teacher, work / f"search{multiple}", args, multiple, log)
        r["variants"][name] = evaluate(work / f"search{multiple}", args, log)
    for name, res in r["variants"].items():
        log_step(f"{name}: ppl {res['perplexity']:.2f} (loss {res['loss']:.4f})")
    best = r["searches"][args.multiples[0]]
    r["importance"] = importance_at(work, teacher, best["target"], args, log, args.methods)
    if args.recovery_iters:
        data = stages.preprocess(SAMPLES / "train.jsonl", hf, work / "data" / "train", log)
        stages.reshard(teacher, work / "teacher-tp1", 1, log)
        r["recovery"] = {"hand shape (demo)": recover(work, "hand", work / "hand", hf, data, args, log),
                         f"search (width multiple {args.multiples[0]})":
                             recover(work, "search", work / f"search{args.multiples[0]}", hf, data, args, log)}
        for name, res in r["recovery"].items():
            log_step(f"{name} after recovery: ppl {res['perplexity']:.2f}")
    return r


def resume(args, work: Path) -> dict:
    """Add the importance methods an earlier run (same --keep directory) did not measure."""
    r = json.loads(RESULTS_JSON.read_text())
    r["searches"] = {int(k): v for k, v in r["searches"].items()}
    missing = [m for m in args.methods if not any(k.split()[0] == m for k in r["importance"])]
    shape = r["searches"][args.multiples[0]]["target"]
    r["importance"].update(importance_at(work, work / "teacher-tp3", shape, args, work / "budget.log", missing))
    return r


def importance_at(work: Path, teacher: Path, shape: dict, args, log: Path, methods: list[str]) -> dict:
    """Importance methods at the same (searched) shape. magnitude has no layer scores: it drops the layers
    the search's activation plan dropped (Block Influence)."""
    out = {}
    dropped_by_activation = json.loads((work / f"search{args.multiples[0]}" / "prune_plan.json").read_text()
                                       )["dropped_layers"]
    runs = [(m, 1234) for m in methods if m != "random"]
    runs += [("random", s) for s in range(1, args.seeds + 1)] if "random" in methods else []
    for importance, seed in runs:
        dropped = dropped_by_activation if importance == "magnitude" else None
        ckpt = work / f"imp-{importance}-{seed}"
        res = hand(teacher, ckpt, args, log, importance, dropped, seed, shape)
        label = importance + (f" (seed {seed})" if importance == "random" else "")
        out[label] = {**evaluate(ckpt, args, log), "prune_seconds": res["wall"]}
        log_step(f"{label} at the searched shape: ppl {out[label]['perplexity']:.2f} ({res['wall']:.0f} s)")
        shutil.rmtree(ckpt, ignore_errors=True)
    return out


def render(r: dict, args) -> str:
    ppl = lambda res: f"{res['perplexity']:,.2f}"  # noqa: E731
    first = r["searches"][args.multiples[0]]
    s = first["search"]
    chosen = s["candidates"][s["chosen"]]
    evals = [c["evaluate"] for c in s["seconds"]["candidates"]]
    builds = [c["build"] for c in s["seconds"]["candidates"]]
    base = s["seconds"]["scores"] + sum(evals)
    lines = [
        "## Pruning to a budget: search vs hand-picked shape, SmolLM2-135M-Instruct",
        "",
        f"Command: `python benchmarks/budget_search.py{'' if args.recovery_iters else ' --recovery-iters 0'}` "
        f"(2-core CPU, TP={TP}, fp32). Budget {BUDGET:,} parameters (the demo's hand shape: 20 layers, hidden 480, "
        f"6 heads / 3 groups, FFN 1020). Importance: activation, {args.calib_samples} x 256 calibration tokens of "
        f"train.jsonl; the search ranks the closest shapes (at most {args.candidates}; {len(s['candidates'])} fit at "
        f"width multiple {args.multiples[0]}) by loss on {args.eval_samples} further "
        f"windows of train.jsonl held apart from scoring. Perplexity below: {r['teacher']['tokens']:,} tokens of "
        f"heldout.jsonl (seen by neither). Unpruned: {ppl(r['teacher'])}.",
        "",
        "| variant | shape | params | heldout ppl right after pruning |"
        + (" heldout ppl after recovery |" if r.get("recovery") else ""),
        "|---|---|---:|---:|" + ("---:|" if r.get("recovery") else ""),
    ]
    shapes = {"hand shape (demo)": r["hand"]["target"]}
    shapes.update({f"search (width multiple {m})": x["target"] for m, x in r["searches"].items()})
    for name, res in r["variants"].items():
        t = shapes[name]
        from megatron_prune.config.shape import LlamaShape

        row = (f"| {name} | {t['num_layers']} layers, hidden {t['hidden_size']}, heads {t['num_attention_heads']}/"
               f"{t['num_query_groups']}, FFN {t['ffn_hidden_size']} | {LlamaShape.from_dict(t).num_params():,} | "
               f"{ppl(res)} |")
        if r.get("recovery"):
            rec = r["recovery"].get(name)
            row += f" {ppl(rec) if rec else '-'} |"
        lines.append(row)
    lines += ["", reading(r, args)]
    if r.get("recovery"):
        tokens = next(iter(r["recovery"].values()))["tokens_trained"]
        lines += ["", f"Recovery: {args.recovery_iters} iterations = {tokens:,} tokens of distillation from the "
                      "unpruned model (the demo's recipe) for each start; one seed each."]
    lines += ["", "The search's candidates (width multiple {}), held-out loss on the held-apart train windows:".format(
        args.multiples[0]), "", "```", table(s), "```", "",
        "Importance methods at the searched shape ({} layers, hidden {}, heads {}/{}, FFN {}), right after pruning "
        "(magnitude drops the layers activation's Block Influence dropped; random: {} seeds):".format(
            first["target"]["num_layers"], first["target"]["hidden_size"], first["target"]["num_attention_heads"],
            first["target"]["num_query_groups"], first["target"]["ffn_hidden_size"], args.seeds), "",
        "| importance | heldout ppl | prune wall time (3 procs) |", "|---|---:|---:|"]
    lines += [f"| {k} | {ppl(v)} | {v['prune_seconds']:.0f} s |" for k, v in r["importance"].items()]
    lines += ["", "Cost of the search (width multiple {}): scores {:.1f} s + {} candidates' held-out passes {:.1f} s "
              "= {:.1f} s; building the candidates in memory {:.1f} s more; search total {:.1f} s = {:.2f}x the "
              "scoring pass plus the candidate evaluations. Whole command {:.0f} s (hand-shape prune: {:.0f} s). "
              "Peak RSS per rank: search {:.2f} GiB vs hand-shape prune {:.2f} GiB; one rank's source shard is "
              "{:.2f} GiB.".format(
                  args.multiples[0], s["seconds"]["scores"], len(evals), sum(evals), base, sum(builds),
                  s["seconds"]["total"], s["seconds"]["total"] / base, first["wall"], r["hand"]["wall"],
                  max(first["peak_rss"]) / 2**30, max(r["hand"]["peak_rss"]) / 2**30, r["shard_bytes"] / 2**30)]
    return "\n".join(lines)


def reading(r: dict, args) -> str:
    """What the numbers say, computed from them (ratios of perplexities)."""
    name = f"search (width multiple {args.multiples[0]})"
    hand_ppl, search_ppl = r["variants"]["hand shape (demo)"]["perplexity"], r["variants"][name]["perplexity"]
    text = (f"Reading: the search ranked its candidates on held-apart train windows, and heldout.jsonl agrees: its "
            f"pick has {hand_ppl / search_ppl:.1f}x lower perplexity than the hand shape right after pruning")
    if r.get("recovery"):
        a, b = r["recovery"]["hand shape (demo)"]["perplexity"], r["recovery"][name]["perplexity"]
        text += f" and {100 * (1 - b / a):.0f}% lower after the same recovery tokens"
    same = len({json.dumps(x["target"], sort_keys=True) for x in r["searches"].values()}) == 1
    text += (". Rounding widths to " + " vs ".join(str(m) for m in r["searches"]) +
             (": the same pick, so the quantizer-friendly multiple cost nothing here. " if same else
              ": different picks (see the table for the loss each costs). "))
    randoms = [v["perplexity"] for k, v in r["importance"].items() if k.startswith("random")]
    if len(randoms) > 1:
        text += (f"Noise: activation and Taylor scores are deterministic for a given calibration text; the random "
                 f"plans' {len(randoms)} seeds span {max(randoms) / min(randoms):.0f}x, so only large gaps between "
                 "weak plans mean anything. Each recovery run is one seed.")
    return text


def table(s: dict) -> str:
    rows = []
    for i, c in enumerate(s["candidates"], 1):
        t = c["shape"]
        rows.append(f"{i:>2}  layers={t['num_layers']:<2} hidden={t['hidden_size']:<4} heads={t['num_attention_heads']}"
                    f"/{t['num_query_groups']} ffn={t['ffn_hidden_size']:<5} {c['params']:>11,}  loss {c['score']:.4f}"
                    + ("  chosen" if i - 1 == s["chosen"] else ""))
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--eval-samples", type=int, default=16, help="windows the search holds apart (default 16)")
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--multiples", type=int, nargs="+", default=[128, 32],
                    help="width multiples to search with; the first is the headline (default 128 32)")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--seeds", type=int, default=3, help="random plans (default 3)")
    ap.add_argument("--recovery-iters", type=int, default=30, help="equal-token recovery per start (0: skip)")
    ap.add_argument("--methods", nargs="+", default=["activation", "taylor", "magnitude", "random"],
                    help="importance methods compared at the searched shape")
    ap.add_argument("--no-write", action="store_true", help="print without updating RESULTS.md")
    ap.add_argument("--keep", default=None, help="keep the work directory here")
    ap.add_argument("--resume", action="store_true",
                    help="with --keep of an earlier run: only run the --methods missing from its results")
    args = ap.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="budget_search_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        r = resume(args, work) if args.resume else run(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    RESULTS_JSON.write_text(json.dumps(r, indent=1, default=str) + "\n")
    body = render(r, args)
    print(body)
    if not args.no_write:
        update_prune_section("budget", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
