"""OUT/report.json and OUT/report.md from the stage records: per stage its seconds, peak memory and output; the
held-out loss of the original, pruned and recovered models with their parameter counts ("pruned": after the last
round's prune, before its training); per prune/recover round its target, pruned shape and training iterations."""

from __future__ import annotations

import json
from pathlib import Path


def build_report(records: list[dict], out: Path) -> dict:
    from megatron_prune.checkpoint.megatron_io import read_meta

    evals = next(r for r in records if r["kind"] == "eval")["results"]
    models = {}
    for res in evals:
        models[res["label"]] = {"params": read_meta(res["load"]).shape.num_params(), "loss": res["loss"],
                                "perplexity": res["perplexity"], "tokens": res.get("tokens"), "checkpoint": res["load"]}
    stages = [{"name": r["name"], "seconds": r["seconds"], "peak_rss_gib": round(r["peak_rss_bytes"] / 2**30, 3),
               "output": list(r["outputs"].values()) or ([str(out / "hf")] if r["kind"] == "publish" else [])}
              for r in records]
    return {"hf": str(out / "hf"), "recipe": str(out / "recipe.yaml"), "stages": stages, "models": models,
            "rounds": rounds(records)}


def rounds(records: list[dict]) -> list[dict]:
    """Per prune/recover round: the prune's parameter target (as given to it), the pruned shape and its
    parameters, and the training iterations that followed (the data samples skipped before them)."""
    from megatron_prune.checkpoint.megatron_io import read_meta
    from megatron_prune.prune.search_space import shape_line

    out: list[dict] = []
    for r in records:
        args = r["commands"][0] if r["commands"] else []
        if r["kind"] == "prune":
            shape = read_meta(r["outputs"]["ckpt"]).shape
            out.append({"round": len(out) + 1, "prune_stage": r["name"],
                        "target_params": _value(args, "--target-params"), "params": shape.num_params(),
                        "shape": shape_line(shape)})
        elif r["kind"] == "train" and out:
            out[-1].update(train_stage=r["name"], train_iters=int(_value(args, "--train-iters")),
                           skip_samples=int(_value(args, "--skip-samples") or 0))
    return out


def _value(args: list[str], flag: str) -> str | None:
    """The value of the last `flag` in a command (argparse: the last one wins)."""
    hits = [i for i, a in enumerate(args[:-1]) if a == flag]
    return args[hits[-1] + 1] if hits else None



def write_report(report: dict, out: Path) -> None:
    from megatron_prune.checkpoint.atomic import atomic_write_text

    atomic_write_text(out / "report.json", json.dumps(report, indent=1) + "\n")
    atomic_write_text(out / "report.md", markdown(report))


def markdown(report: dict) -> str:
    lines = ["# compress report", "", f"Final HF model: `{report['hf']}` (recipe: `{report['recipe']}`)", "",
             "| model | parameters | held-out loss | perplexity |", "|---|---:|---:|---:|"]
    for name, m in report["models"].items():
        lines.append(f"| {name} | {m['params']:,} | {m['loss']:.4f} | {m['perplexity']:.2f} |")
    if report.get("rounds"):
        lines += ["", "| round | target params | params | shape | training iterations |", "|---:|---:|---:|---|---:|"]
        for r in report["rounds"]:
            target = r["target_params"] or "-"
            lines.append(f"| {r['round']} | {f'{int(target):,}' if target.isdigit() else target} | {r['params']:,} | "
                         f"{r['shape']} | {r.get('train_iters', '-')} |")
    lines += ["", "| stage | seconds | peak RSS (GiB) | output |", "|---|---:|---:|---|"]
    for s in report["stages"]:
        lines.append(f"| {s['name']} | {s['seconds']:.1f} | {s['peak_rss_gib']:.2f} | {', '.join(s['output'])} |")
    if report.get("loss_png"):
        lines += ["", f"![loss curves]({Path(report['loss_png']).name})"]
    return "\n".join(lines) + "\n"


def metrics_files(records: list[dict]) -> list[str]:
    return [str(Path(r["outputs"]["ckpt"]) / "metrics.jsonl") for r in records if r["kind"] == "train"]
