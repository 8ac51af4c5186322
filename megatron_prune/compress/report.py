"""OUT/report.json and OUT/report.md from the stage records: per stage its seconds, peak memory and output, and
the held-out loss of the original, pruned and recovered models with their parameter counts."""

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
    return {"hf": str(out / "hf"), "recipe": str(out / "recipe.yaml"), "stages": stages, "models": models}


def write_report(report: dict, out: Path) -> None:
    from megatron_prune.checkpoint.atomic import atomic_write_text

    atomic_write_text(out / "report.json", json.dumps(report, indent=1) + "\n")
    atomic_write_text(out / "report.md", markdown(report))


def markdown(report: dict) -> str:
    lines = ["# compress report", "", f"Final HF model: `{report['hf']}` (recipe: `{report['recipe']}`)", "",
             "| model | parameters | held-out loss | perplexity |", "|---|---:|---:|---:|"]
    for name, m in report["models"].items():
        lines.append(f"| {name} | {m['params']:,} | {m['loss']:.4f} | {m['perplexity']:.2f} |")
    lines += ["", "| stage | seconds | peak RSS (GiB) | output |", "|---|---:|---:|---|"]
    for s in report["stages"]:
        lines.append(f"| {s['name']} | {s['seconds']:.1f} | {s['peak_rss_gib']:.2f} | {', '.join(s['output'])} |")
    if report.get("loss_png"):
        lines += ["", f"![loss curves]({Path(report['loss_png']).name})"]
    return "\n".join(lines) + "\n"


def metrics_files(records: list[dict]) -> list[str]:
    return [str(Path(r["outputs"]["ckpt"]) / "metrics.jsonl") for r in records if r["kind"] == "train"]
