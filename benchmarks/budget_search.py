"""Pruning to a parameter budget on SmolLM2-135M-Instruct (TP=3): the search's pick vs the demo's hand shape vs the
best of every valid shape (exhaustive), at width multiples 128, 64 and 8, HF-loadable shapes only (the default) and
with --megatron-only-shapes; right after pruning and after equal recovery tokens (distillation from the unpruned
model). ModelOpt's divisor-128 pick (19 layers / hidden 384 / 9 heads / FFN 1536) is pruned by hand as a reference.

    python benchmarks/budget_search.py --keep /tmp/budget            # everything (hours on 2 busy cores)
    python benchmarks/budget_search.py --keep /tmp/budget --recovery-iters 0
    python benchmarks/budget_search.py --keep /tmp/budget --render   # RESULTS.md from what /tmp/budget holds

Budget: the demo's hand shape (20 layers, hidden 480, 6 heads / 3 groups, FFN 1020) = 64,047,840 parameters.
The searches, hand prunes, evaluations and recoveries are the CLI a user runs (`prune --target-params`, `prune`
with sizes, `eval`, `reshard`, `train`). Calibration: the first 32 x 256 tokens of the shipped train.jsonl (the
search holds 16 more windows apart to rank its candidates); every reported loss is on the first 8,192 tokens of
heldout.jsonl (16 x 512), which neither pruning nor training sees.

Exhaustive (benchmarks/budget_exhaustive.py, one torchrun launch per batch): every valid shape within 80-100% of the
budget (the widest window the search may use) enumerated by plain loops, pruned in memory from the same activation
scores and evaluated on the held-out text; losses are cached in KEEP/exhaustive.jsonl (per 2,048-token chunk), so
a run resumes. Where the valid shapes are too many for a full evaluation (multiple 8), see `exhaustive_plan`.
Every step's result is kept in KEEP/results.json: a second run skips what is done.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from megatron_prune.checkpoint import megatron_io as mio
from megatron_prune.demo import stages
from megatron_prune.demo.pipeline import last_json, run_cli
from megatron_prune.testing import run_distributed

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_prune import update_prune_section  # noqa: E402
from benchmarks.budget_exhaustive import every_shape  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "megatron_prune" / "data" / "samples"
CACHE = Path.home() / ".cache" / "megatron_prune"
BUDGET = 64_047_840
TP = 3
HAND = (20, 480, 6, 3, 1020)
MODELOPT = (19, 384, 9, 3, 1536)   # ModelOpt 0.43 Minitron NAS, divisor 128 (issue 25)
FLOOR = 0.80                        # search_space.WINDOW_FLOOR: the widest window the search may use
CHUNK = 4                           # held-out windows of 512 tokens per cached chunk (2,048 tokens)


def log_step(msg: str) -> None:
    print(f"[budget] {msg}", flush=True)


class Results:
    """KEEP/results.json: every finished step, so that a second run skips it."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def get(self, name: str, fn):
        if name not in self.data:
            self.data[name] = fn()
            self.path.write_text(json.dumps(self.data, indent=1) + "\n")
        return self.data[name]


def key_of(shape: dict) -> tuple[int, ...]:
    return (shape["num_layers"], shape["hidden_size"], shape["num_attention_heads"], shape["num_query_groups"],
            shape["ffn_hidden_size"])


def params(src, key) -> int:
    return src.replace(num_layers=key[0], hidden_size=key[1], num_attention_heads=key[2], num_query_groups=key[3],
                       ffn_hidden_size=key[4]).num_params()


def label(key) -> str:
    return f"{key[0]}/{key[1]}/{key[2]}/{key[4]}"


def calib_args(args) -> list[str]:
    return ["--calib-data", str(SAMPLES / "train.jsonl"), "--calib-samples", str(args.calib_samples),
            "--calib-seq-length", "256"]


def evaluate(ckpt: Path, args, log: Path, nproc: int = TP, tokenizer: Path | None = None) -> dict:
    return stages.evaluate(ckpt, SAMPLES / "heldout.jsonl", args.eval_tokens, nproc, log, tokenizer)


# ----------------------------------------------------------------------------- the CLI runs
def search(work: Path, args, multiple: int, megatron_only: bool, log: Path) -> dict:
    out = work / f"search-{multiple}-{'mc' if megatron_only else 'hf'}"
    t0 = time.perf_counter()
    res = last_json(run_cli(["prune", "--load", str(work / "teacher-tp3"), "--save", str(out), "--target-params",
                             str(BUDGET), "--importance", "activation", *calib_args(args), "--width-multiple",
                             str(multiple), "--search-candidates", str(args.candidates), "--search-eval-samples",
                             str(args.eval_samples), *(["--megatron-only-shapes"] if megatron_only else []),
                             "--overwrite", "--no-progress", "--json"], nproc=TP, log=log))
    wall = time.perf_counter() - t0
    return {"ckpt": str(out), "wall": wall, "search": res["search"], "peak_rss": res["peak_rss"],
            "key": key_of(res["target"]), "heldout": evaluate(out, args, log)}


def hand(work: Path, key, args, log: Path) -> dict:
    """Prune to `key` by hand (activation importance, the same calibration windows) and evaluate it."""
    layers, hidden, heads, groups, ffn = key
    out = work / f"hand-{'-'.join(map(str, key))}"
    t0 = time.perf_counter()
    res = last_json(run_cli(["prune", "--load", str(work / "teacher-tp3"), "--save", str(out), "--importance",
                             "activation", *calib_args(args), "--hidden-size-remain", str(hidden),
                             "--num-attention-heads-remain", str(heads), "--num-query-groups-remain", str(groups),
                             "--ffn-hidden-size-remain", str(ffn), "--num-layers-remain", str(layers),
                             "--width-multiple", "1", "--overwrite", "--no-progress", "--json"], nproc=TP, log=log))
    return {"ckpt": str(out), "wall": time.perf_counter() - t0, "peak_rss": res["peak_rss"],
            "heldout": evaluate(out, args, log)}


def recover(work: Path, name: str, start: Path, data: str, args, log: Path) -> dict:
    """Equal-token recovery (the demo's recipe: distillation from the unpruned model, 2 DP ranks at TP=1)."""
    hf = CACHE / "smollm2-135m-hf"
    stages.reshard(start, work / f"rec-{name}-tp1", 1, log)
    plan = stages.DemoPlan(train_iters=args.recovery_iters, eval_iters=0)
    stages.train(work / f"rec-{name}-tp1", work / "teacher-tp1", data, hf, work / f"rec-{name}-run", plan, log)
    res = evaluate(work / f"rec-{name}-run", args, log, nproc=2, tokenizer=hf)
    res["tokens_trained"] = plan.train_iters * plan.global_batch * plan.seq_length
    shutil.rmtree(work / f"rec-{name}-tp1", ignore_errors=True)
    return res


# ----------------------------------------------------------------------------- exhaustive
def maximal(valid: list[tuple]) -> set[tuple]:
    """The valid keys (all within the budget) of which no valid key is larger on exactly one axis, the others
    equal: plain loops over the values each axis takes."""
    have = set(valid)
    values = [sorted({k[i] for k in valid}) for i in range(5)]

    def grows(key) -> bool:
        for i in (0, 1, 4):  # layers, hidden, FFN
            if any(key[:i] + (v,) + key[i + 1:] in have for v in values[i] if v > key[i]):
                return True
        return any((key[0], key[1], h, g, key[4]) in have for h, g in {(k[2], k[3]) for k in valid} if h > key[2])
    return {k for k in valid if not grows(k)}


def exhaustive_plan(src, args) -> dict:
    """Per (multiple, shape set): every valid shape in 80-100% of the budget, its maximal ones, and what is
    evaluated: all maximal shapes plus every valid shape in 95-100% on the whole held-out text when those are at
    most --full-max; otherwise (multiple 8: 133 and 561 maximal shapes) every maximal shape on the first 2,048
    held-out tokens (a screen), then the --refine best of that screen and the search's pick on all 8,192.
    Shapes that are not maximal are left out there: each keeps a subset of the units of a maximal shape within
    the budget (the selections are nested), and where every one was evaluated (multiples 128 and 64) none beat
    the best maximal shape (the 'dominated' line of the table)."""
    plan = {}
    for multiple in args.multiples:
        for mc in (False, True):
            valid = every_shape(src, TP, BUDGET, multiple, mc, FLOOR)
            top = maximal(valid)
            inner = {k for k in valid if params(src, k) >= 0.95 * BUDGET}
            full = sorted(top | inner)
            plan[f"{multiple}-{'mc' if mc else 'hf'}"] = {
                "valid": valid, "maximal": sorted(top), "inner": sorted(inner),
                "full": full if len(full) <= args.full_max else None,
                "screen": None if len(full) <= args.full_max else sorted(top)}
    return plan


def run_exhaustive(work: Path, keys: list[tuple], chunks: list[int], args, log: Path) -> float:
    """Evaluate `keys` on held-out `chunks` (cached in KEEP/exhaustive.jsonl); returns the wall seconds."""
    cache = cached(work)
    todo = [k for k in keys if any((tuple(k), c) not in cache for c in chunks)]
    if not todo:
        return 0.0
    log_step(f"exhaustive: {len(todo)} shapes x chunks {chunks}")
    payload = dict(load=str(work / "teacher-tp3"), calib=dict(data=str(SAMPLES / "train.jsonl"),
                   samples=args.calib_samples, seq_length=256, micro_batch_size=4),
                   heldout=str(SAMPLES / "heldout.jsonl"), tokenizer=str(work / "teacher-tp3"),
                   eval_tokens=args.eval_tokens, seq_length=512, chunk=CHUNK, chunks=chunks,
                   keys=[list(k) for k in todo], out=str(work / "exhaustive.jsonl"), scores=str(work / "scores.pt"))
    t0 = time.perf_counter()
    run_distributed(TP, "benchmarks.budget_exhaustive:evaluate_shapes", payload, timeout=None)
    return time.perf_counter() - t0


def cached(work: Path) -> dict:
    path = work / "exhaustive.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return {(tuple(r["key"]), r["chunk"]): r for r in rows}


def full_losses(work: Path, args) -> dict[tuple, float]:
    """Mean held-out loss over the whole text, for every shape whose chunks are all cached."""
    chunks = range(args.eval_tokens // (CHUNK * 512))
    by = {}
    for (key, c), r in cached(work).items():
        by.setdefault(key, {})[c] = r["loss"]
    return {k: sum(v[c] for c in chunks) / len(chunks) for k, v in by.items() if all(c in v for c in chunks)}


def exhaustive(work: Path, plan: dict, picks: dict, args, log: Path) -> dict:
    """Run the plan (full evaluations, then screens and their refinement); the cost in wall seconds."""
    chunks = list(range(args.eval_tokens // (CHUNK * 512)))
    seconds = run_exhaustive(work, sorted({tuple(k) for p in plan.values() if p["full"] for k in p["full"]}
                                          | {HAND, MODELOPT}), chunks, args, log)
    screens = sorted({tuple(k) for p in plan.values() if p["screen"] for k in p["screen"]})
    seconds += run_exhaustive(work, screens, [0], args, log)
    cache, refine = cached(work), set()
    for name, p in plan.items():
        if p["screen"]:
            ranked = sorted(p["screen"], key=lambda k: cache[tuple(k), 0]["loss"])
            refine |= {tuple(k) for k in ranked[:args.refine]} | {tuple(picks[name]["key"])}
    seconds += run_exhaustive(work, sorted(refine), chunks, args, log)
    evals = sum(r["seconds"] for r in cached(work).values())
    return {"wall_seconds": seconds, "eval_seconds": evals}


# ----------------------------------------------------------------------------- what the numbers say
def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = (torch.tensor(x, dtype=torch.float64).argsort().argsort().double() for x in (a, b))
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def analyse(work: Path, src, plan: dict, r: dict, args) -> dict:
    """Per shape set: the best evaluated shape, our pick's gap to it, the proxy's rank agreement, and the checks
    behind the exhaustive reference (dominated shapes never best; the screen's rank of the best)."""
    from megatron_prune.prune.search_proxy import Kept

    full, cache = full_losses(work, args), cached(work)
    kept = Kept.of(torch.load(work / "scores.pt", weights_only=False), src, TP, [(6, 3), (9, 3)])
    damage = {tuple(k): kept.damage(src.replace(num_layers=k[0], hidden_size=k[1], num_attention_heads=k[2],
                                                ffn_hidden_size=k[4])) for p in plan.values() for k in p["valid"]}
    out = {}
    for name, p in plan.items():
        pick = tuple(r[f"search-{name}"]["key"])
        done = [tuple(k) for k in (p["full"] or p["screen"]) if tuple(k) in full]
        best = min(done, key=full.get)
        a = {"best": best, "best_loss": full[best], "pick": pick, "pick_loss": full[pick],
             "gap": full[pick] - full[best], "proxy_rank_of_best": sorted(p["maximal"], key=damage.get).index(best) + 1
             if best in {tuple(k) for k in p["maximal"]} else None}
        if p["full"]:
            keys = [tuple(k) for k in p["full"]]
            a["spearman"] = spearman([damage[k] for k in keys], [full[k] for k in keys])
            a["spearman_over"] = f"{len(keys)} shapes, whole held-out text"
            tops = {tuple(k) for k in p["maximal"]}
            dominated = [k for k in keys if k not in tops]
            a["dominated"] = (sum(full[k] < min(full[m] for m in tops) for k in dominated), len(dominated))
            screen_order = sorted(keys, key=lambda k: cache[k, 0]["loss"])
            a["screen_rank_of_best"] = screen_order.index(best) + 1
        else:
            keys = [tuple(k) for k in p["screen"]]
            a["spearman"] = spearman([damage[k] for k in keys], [cache[k, 0]["loss"] for k in keys])
            a["spearman_over"] = f"{len(keys)} maximal shapes, first 2,048 held-out tokens"
            a["refined"] = len(done)
        out[name] = a
    return out


# ----------------------------------------------------------------------------- the run
def run(args, work: Path) -> dict:
    from megatron_prune.demo.model_source import fetch_smollm2

    log, res = work / "budget.log", Results(work / "results.json")
    hf = fetch_smollm2(CACHE / "smollm2-135m-hf", CACHE)
    teacher = work / "teacher-tp3"
    if not teacher.exists():
        run_cli(["convert", "hf-to-megatron", "--hf-dir", str(hf), "--save", str(teacher), "--tp", str(TP),
                 "--dtype", "fp32", "--no-progress"], log=log)
    src = mio.read_meta(teacher).shape
    res.get("teacher", lambda: evaluate(teacher, args, log))
    for key in (HAND, MODELOPT):
        done = res.get(f"hand-{label(key)}", lambda: hand(work, key, args, log))
        log_step(f"hand {label(key)}: loss {done['heldout']['loss']:.4f}")
    for multiple in args.multiples:
        for mc in (False, True):
            name = f"{multiple}-{'mc' if mc else 'hf'}"
            s = res.get(f"search-{name}", lambda: search(work, args, multiple, mc, log))
            log_step(f"search {name}: {label(s['key'])} loss {s['heldout']['loss']:.4f} ({s['wall']:.0f} s)")
    plan = exhaustive_plan(src, args)
    picks = {name: res.data[f"search-{name}"] for name in plan}
    res.get("exhaustive_cost", lambda: exhaustive(work, plan, picks, args, log))
    analysis = analyse(work, src, plan, res.data, args)
    for name, a in analysis.items():
        log_step(f"{name}: pick {label(a['pick'])} {a['pick_loss']:.4f} vs best {label(a['best'])} "
                 f"{a['best_loss']:.4f} (gap {a['gap']:+.4f})")
    if args.recovery_iters:
        data = stages.preprocess(SAMPLES / "train.jsonl", hf, work / "data" / "train", log)
        if not (work / "teacher-tp1").exists():
            stages.reshard(teacher, work / "teacher-tp1", 1, log)
        starts = {label(HAND): Path(res.data[f"hand-{label(HAND)}"]["ckpt"]),
                  label(MODELOPT): Path(res.data[f"hand-{label(MODELOPT)}"]["ckpt"])}
        for name, a in analysis.items():
            starts.setdefault(label(a["pick"]), Path(res.data[f"search-{name}"]["ckpt"]))
            if a["best"] != a["pick"] and label(a["best"]) not in starts:
                starts[label(a["best"])] = Path(res.get(f"hand-{label(a['best'])}",
                                                        lambda: hand(work, a["best"], args, log))["ckpt"])
        for name, start in starts.items():
            rec = res.get(f"recovery-{name}", lambda: recover(work, name.replace("/", "-"), start, data, args, log))
            log_step(f"{name} after recovery: loss {rec['loss']:.4f}")
    return {"results": res.data, "analysis": {k: {**v, "best": list(v["best"]), "pick": list(v["pick"])}
                                              for k, v in analysis.items()},
            "plan": {k: {"valid": len(p["valid"]), "maximal": len(p["maximal"]), "inner": len(p["inner"]),
                         "full": len(p["full"]) if p["full"] else None} for k, p in plan.items()}}


# ----------------------------------------------------------------------------- RESULTS.md
def render(out: dict, args) -> str:
    r, an, plan = out["results"], out["analysis"], out["plan"]
    hand_loss = r[f"hand-{label(HAND)}"]["heldout"]["loss"]
    mo_loss = r[f"hand-{label(MODELOPT)}"]["heldout"]["loss"]
    lines = [
        "## Pruning to a budget: the search vs the hand shape vs every valid shape, SmolLM2-135M-Instruct", "",
        f"Command: `python benchmarks/budget_search.py --keep DIR` (2-core CPU shared with other jobs, TP={TP}, "
        f"fp32). Budget {BUDGET:,} parameters (the demo's hand shape {label(HAND)}: layers/hidden/heads/FFN, 3 "
        f"query groups). Activation importance on {args.calib_samples} x 256 tokens of train.jsonl; the search "
        f"ranks the maximal shapes of its window by the importance proxy, evaluates the best "
        f"{args.candidates} by loss on {args.eval_samples} further train windows, and keeps the lowest. Every loss "
        f"below: mean next-token loss (nats) on the first {args.eval_tokens:,} tokens of heldout.jsonl (seen by "
        f"neither pruning nor training). Unpruned: {r['teacher']['loss']:.4f}. Hand shape: {hand_loss:.4f}. "
        f"ModelOpt's divisor-128 pick {label(MODELOPT)} (megatron-core only), pruned by hand with our tool: "
        f"{mo_loss:.4f}.", "",
        "| multiple | shapes | window | valid shapes | maximal | our pick | % of budget | loss | best valid shape "
        "(exhaustive) | loss | ours - best | ours - hand |",
        "|---:|---|---|---:|---:|---|---:|---:|---|---:|---:|---:|"]
    for name, a in an.items():
        multiple, kind = name.split("-")
        sp = r[f"search-{name}"]["search"]["space"]
        chosen = r[f"search-{name}"]["search"]["candidates"][r[f"search-{name}"]["search"]["chosen"]]
        how = "all" if plan[name]["full"] else f"screen + top {args.refine}"
        lines.append(
            f"| {multiple} | {'HF-loadable' if kind == 'hf' else 'megatron-only'} | {100 * sp['window'][0]:.0f}-100%"
            f"{' (widened)' if sp['widened'] else ''} | {sp['valid_shapes']:,} | {sp['maximal_shapes']} | "
            f"{label(a['pick'])} | {100 * chosen['params'] / BUDGET:.1f} | {a['pick_loss']:.4f} | "
            f"{label(a['best'])} ({how}) | {a['best_loss']:.4f} | {a['gap']:+.4f} | "
            f"{a['pick_loss'] - hand_loss:+.4f} |")
    lines += ["", proxy_text(an, plan, args), "", cost_text(r, an, plan, args)]
    rec = {k[len("recovery-"):]: v for k, v in r.items() if k.startswith("recovery-")}
    if rec:
        tokens = next(iter(rec.values()))["tokens_trained"]
        lines += ["", f"After equal recovery: {args.recovery_iters} iterations = {tokens:,} tokens of distillation "
                      "from the unpruned model (the demo's recipe, with the distillation fix of issue 21) for each "
                      "start, training seed 1234 (data order) for all: one seed each. The seed-to-seed spread of "
                      "this recipe, measured by the quality report above (60 iterations, seeds 1234 and 4321), is "
                      f"{KD_SEED_SPREAD} nats of held-out loss; here the searched shape ends "
                      f"{min_gap(rec, label(HAND)):.3f} nats below the hand shape.", "",
                  "| shape | is | loss after pruning | loss after recovery | ppl |", "|---|---|---:|---:|---:|"]
        roles = shape_roles(an, hand_loss, mo_loss)
        for shape, v in sorted(rec.items(), key=lambda kv: kv[1]["loss"]):
            names, before = roles[shape]
            lines.append(f"| {shape} | {', '.join(names)} | {before:.4f} | {v['loss']:.4f} | {v['perplexity']:,.1f} |")
    return "\n".join(lines)


# held-out loss spread between training seeds 1234 and 4321 of activation + KD in the quality report (RESULTS.md)
KD_SEED_SPREAD = 0.056


def min_gap(rec: dict, hand: str) -> float:
    """How far below the hand shape's loss after recovery the best other start ends."""
    return rec[hand]["loss"] - min(v["loss"] for k, v in rec.items() if k != hand)


def shape_roles(an: dict, hand_loss: float, mo_loss: float) -> dict[str, tuple[list[str], float]]:
    """shape label -> (what it is: ours / best of a set / hand / ModelOpt, its held-out loss after pruning)."""
    out: dict[str, tuple[list[str], float]] = {label(HAND): (["hand"], hand_loss),
                                               label(MODELOPT): (["ModelOpt 128"], mo_loss)}
    for name, a in an.items():
        for role, key, loss in (("ours", a["pick"], a["pick_loss"]), ("best", a["best"], a["best_loss"])):
            names, _ = out.setdefault(label(key), ([], loss))
            names.append(f"{role} {name}")
    return out


def proxy_text(an: dict, plan: dict, args) -> str:
    rows = ", ".join(f"{n} {a['spearman']:.2f} ({a['spearman_over']}; the best is the proxy's "
                     f"#{a['proxy_rank_of_best']} of {plan[n]['maximal']})" for n, a in an.items())
    full = {n: a for n, a in an.items() if "dominated" in a}
    beat, dominated = (sum(a["dominated"][i] for a in full.values()) for i in (0, 1))
    worst_screen = max(a["screen_rank_of_best"] for a in full.values())
    multiples = ", ".join(sorted({n.split("-")[0] for n in full}, key=int))
    screened = [n for n in an if not plan[n]["full"]]
    maximal = ", ".join(f"{n}: {plan[n]['maximal']}" for n in screened)
    left = ", ".join(f"{n}: {plan[n]['valid'] - plan[n]['maximal']}" for n in screened)
    return (f"The importance proxy (damage estimate, lower = keeps more) against the held-out loss, Spearman rank "
            f"correlation: {rows}. The exhaustive reference: where every valid shape of 95-100% and every maximal "
            f"shape of 80-100% was evaluated on the whole text (multiples {multiples}), {beat} of the {dominated} "
            f"non-maximal shapes beat the best maximal shape (each keeps a subset of the units of a maximal shape in "
            f"the budget), and the whole-text best was at most #{worst_screen} on the first 2,048 tokens. At "
            f"multiple 8 the maximal shapes ({maximal}) were screened on the first 2,048 held-out tokens and the "
            f"best {args.refine} of each screen (plus our pick) evaluated on all {args.eval_tokens:,}; the "
            f"non-maximal shapes ({left}) were not evaluated, by the dominance above.")


def cost_text(r: dict, an: dict, plan: dict, args) -> str:
    parts = []
    for name in an:
        s = r[f"search-{name}"]["search"]["seconds"]
        evals = sum(c["evaluate"] for c in s["candidates"])
        base = s["scores"] + evals
        parts.append(f"{name}: scores {s['scores']:.0f} s + {len(s['candidates'])} candidates {evals:.0f} s, proxy "
                     f"{s['proxy']:.2f} s, total {s['total']:.0f} s = {s['total'] / base:.2f}x")
    cost = r["exhaustive_cost"]
    shapes = len({k for k, _ in cached_keys(args)})
    walls = [r[f"search-{n}"]["wall"] for n in an]
    return (f"Cost of the search (prune_search.json seconds; ratio = total / (scoring pass + the evaluated "
            f"candidates' held-out passes)): {'; '.join(parts)}. The exhaustive reference: {shapes} shapes, "
            f"{cost['eval_seconds'] / 3600:.1f} h of held-out evaluation passes ({cost['wall_seconds'] / 3600:.1f} h "
            f"wall in the last run; shapes already cached are not evaluated again), against "
            f"{min(walls):.0f}-{max(walls):.0f} s per search command.")


def cached_keys(args) -> set:
    return set(cached(Path(args.keep)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", required=True, help="work directory (kept; a second run resumes from it)")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--eval-samples", type=int, default=16, help="windows the search holds apart (default 16)")
    ap.add_argument("--candidates", type=int, default=8, help="--search-candidates (default 8)")
    ap.add_argument("--multiples", type=int, nargs="+", default=[128, 64, 8])
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--full-max", type=int, default=80,
                    help="evaluate every shape on the whole text when a set has at most this many (default 80)")
    ap.add_argument("--refine", type=int, default=30, help="screened shapes completed to the whole text (30)")
    ap.add_argument("--recovery-iters", type=int, default=30, help="equal-token recovery per start (0: skip)")
    ap.add_argument("--render", action="store_true", help="only render RESULTS.md from --keep's results")
    ap.add_argument("--no-write", action="store_true", help="print without updating RESULTS.md")
    args = ap.parse_args()
    work = Path(args.keep)
    work.mkdir(parents=True, exist_ok=True)
    out_file = work / "budget_search.json"
    out = json.loads(out_file.read_text()) if args.render else run(args, work)
    out_file.write_text(json.dumps(out, indent=1, default=str) + "\n")
    body = render(out, args)
    print(body)
    if not args.no_write:
        update_prune_section("budget", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
