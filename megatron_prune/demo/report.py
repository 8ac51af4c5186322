"""The demo's tables, and how a run's numbers compare with the README's.

The README's demo numbers live in ONE place, `reference.json` beside this file ({"full": results, "quick": results},
each the `demo_results.json` of a `make demo` / `make demo-quick` run). The README's demo section is rendered from
it by `render_tables` / `render_quick` (the same functions that print a run's own report), and every demo run ends by
comparing its numbers with it (`compare`). `python -m megatron_prune.demo.reference RESULTS.json` takes a new run's
results into reference.json and rewrites the README section; a unit test checks that README and reference.json agree.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

REFERENCE = Path(__file__).with_name("reference.json")


def stage_table(rows: list) -> str:
    width = max(len(r[0]) for r in rows)
    lines = [f"| {'stage'.ljust(width)} | time (s) | result |", f"|{'-' * (width + 2)}|---------:|--------|"]
    lines += [f"| {n.ljust(width)} | {s:8.1f} | {note} |" for n, s, note in rows]
    return "\n".join(lines)


def render_tables(res: dict) -> str:
    """Stage table, held-out comparison with HF, and (when recovery ran) the pruning/recovery table."""
    mg, hf = res["megatron"], res["hf"]
    same, total = res["identical_tensors"]
    lines = [stage_table(res["stages"]), "",
             "| held-out text (botchan, never trained on) | loss | perplexity | tokens |", "|---|---:|---:|---:|",
             f"| megatron-core, TP shards | {mg['loss']:.6f} | {mg['perplexity']:.3f} | {mg['tokens']} |",
             f"| HF transformers | {hf['loss']:.6f} | {hf['perplexity']:.3f} | {hf['tokens']} |", "",
             f"|loss difference| = {abs(mg['loss'] - hf['loss']):.2e}; export back to HF: "
             f"{same}/{total} tensors bit-identical."]
    rec = res.get("recovery")
    if rec:
        p = rec["prune"]
        lines += ["", "| model | parameters | held-out loss | perplexity |", "|---|---:|---:|---:|",
                  f"| original (teacher) | {p['params_before']:,} | {mg['loss']:.4f} | {mg['perplexity']:.2f} |"]
        for label, key in (("pruned (activation, balance)", "pruned"), (f"after recovery ({rec_label(res)})",
                                                                         "recovered"),
                           ("after recovery, exported to HF", "recovered_hf")):
            lines.append(f"| {label} | {p['params_after']:,} | {rec[key]['loss']:.4f} | "
                         f"{rec[key]['perplexity']:.2f} |")
    return "\n".join(lines)


def rec_label(res: dict) -> str:
    kd = (res.get("recovery") or {}).get("kd")
    return "KD" if not kd else f"KD, T={kd['temperature']:g}, alpha={kd['alpha']:g}"


# the quick run's sentence names stages briefly: compress's job stages by their kind ("05-train" -> "train"),
# the demo's own checks as below; "compare exported tensors" (0.1 s) and "publish" (a copy) are left out there.
# The first rows are the names of runs before the demo was a compress recipe (reference.json may hold one).
_SHORT = {"convert HF -> Megatron": "convert", "eval megatron-core": "eval megatron-core",
          "eval HF transformers": "eval HF", "export Megatron -> HF": "export", "compare exported tensors": None,
          "tokenize training text": "tokenize", "reshard": "reshard", "recovery training": "recovery",
          "export recovered -> HF": "export", "eval recovered (HF)": "eval HF", "publish": None}


def _short(name: str) -> str | None:
    name = re.sub(r"^\d\d-", "", name)
    for prefix, short in _SHORT.items():
        if name.startswith(prefix):
            return short
    return name.split(" (")[0]


def render_quick(res: dict) -> str:
    """The quick run in one sentence: its perplexities and its per-stage seconds (consecutive stages of one
    kind joined by +)."""
    mg, hf, rec = res["megatron"], res["hf"], res["recovery"]
    parts: list[list] = []
    for name, seconds, _ in res["stages"]:
        short = _short(name)
        if short is None:
            continue
        if parts and parts[-1][0] == short == "reshard":
            parts[-1][1].append(seconds)
        else:
            parts.append([short, [seconds]])
    stages = ", ".join(f"{short} {' + '.join(f'{s:.1f}' for s in secs)}" for short, secs in parts)
    return (f"teacher {mg['perplexity']:.2f} (HF {hf['perplexity']:.2f}), pruned {rec['pruned']['perplexity']:.2f}, "
            f"recovered {rec['recovered']['perplexity']:.2f} (HF {rec['recovered_hf']['perplexity']:.2f}); "
            f"per stage (s): {stages}.")


# ------------------------------------------------------------------------------------- comparison with README
def numbers(res: dict) -> list[tuple[str, str]]:
    """(name, value as the README prints it) of every number a run must reproduce (not the timings): the full
    run's tables, or the quick run's sentence."""
    mg, hf, rec = res["megatron"], res["hf"], res.get("recovery")
    if res.get("quick"):
        out = [("teacher perplexity, megatron-core", f"{mg['perplexity']:.2f}"),
               ("teacher perplexity, HF", f"{hf['perplexity']:.2f}")]
    else:
        out = [("teacher perplexity, megatron-core", f"{mg['perplexity']:.3f}"),
               ("teacher perplexity, HF", f"{hf['perplexity']:.3f}"),
               ("exported tensors bit-identical", "{}/{}".format(*res["identical_tensors"]))]
        if rec:
            out.append(("parameters after pruning", f"{rec['prune']['params_after']:,}"))
    if rec:
        out += [("pruned perplexity", f"{rec['pruned']['perplexity']:.2f}"),
                ("recovered perplexity", f"{rec['recovered']['perplexity']:.2f}"),
                ("recovered perplexity, HF export", f"{rec['recovered_hf']['perplexity']:.2f}")]
    return out


def load_reference(path: Path | None = None) -> dict:
    return json.loads(Path(path or REFERENCE).read_text())


def compare(res: dict, reference: dict | None = None) -> tuple[str, bool]:
    """(text, all equal): this run's numbers beside the README's, at the README's printed precision."""
    kind = "quick" if res.get("quick") else "full"
    ref = (reference or load_reference()).get(kind)
    if ref is None or ref.get("model") != res.get("model"):
        return (f"No README reference for this run ({res.get('model')}, {kind} run): the README's numbers are for "
                f"{(ref or {}).get('model', 'another model')}.", False)
    mine, theirs = dict(numbers(res)), dict(numbers(ref))
    lines = ["| number | this run | README | |", "|---|---:|---:|---|"]
    differ = []
    for name, value in mine.items():
        want = theirs.get(name, "-")
        ok = value == want
        differ += [] if ok else [name]
        lines.append(f"| {name} | {value} | {want} | {'same' if ok else 'DIFFERS'} |")
    where = f"megatron_prune/demo/reference.json, {kind} run"
    verdict = (f"All {len(mine)} numbers are the README's, to the printed digit ({where})." if not differ else
               f"{len(differ)} of {len(mine)} numbers differ from the README's ({where}): {', '.join(differ)}. "
               f"{ref.get('note', '')}".rstrip())
    return "\n".join(["", "How this run compares with the README:", "", *lines, "", verdict]), not differ
