"""python -m megatron_prune plot METRICS.jsonl [METRICS.jsonl ...] --out loss.png

Loss-vs-tokens curves from training metrics files (one line per file: train LM loss, dashed validation loss
when present, and KD loss when distilling). Needs matplotlib (pip install matplotlib).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_prune.errors import InputError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("metrics", nargs="+", help="metrics.jsonl files written by `train` (or their run directories)")
    p.add_argument("--out", default="loss.png", help="PNG to write (default: loss.png)")
    p.add_argument("--labels", nargs="+", default=None,
                   help="legend label per file (default: its run directory, with as many parent folders as tell the "
                        "runs apart: a/recovered and b/recovered)")
    p.add_argument("--title", default="loss vs tokens", help="figure title")
    p.add_argument("--logx", action="store_true", help="logarithmic token axis")


def _metrics_path(arg: str) -> Path:
    path = Path(arg)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise InputError(f"{path}: no such metrics file")
    return path


def legend_labels(paths: list[Path]) -> list[str]:
    """Each run's shortest path suffix that no other run shares: the run directory's name (or the file's stem when
    it is not metrics.jsonl), with parent folders added only where two runs would read alike."""
    runs = [(p.parent if p.name == "metrics.jsonl" else p.with_suffix("")).resolve().parts for p in paths]
    labels = []
    for i, parts in enumerate(runs):
        others = [r for j, r in enumerate(runs) if j != i]
        k = next((k for k in range(1, len(parts) + 1) if all(r[-k:] != parts[-k:] for r in others)), len(parts))
        labels.append("/".join(parts[-k:]).lstrip("/") or "/")
    return labels


def series(records: list[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    """(tokens, values) of one kind of record ("train"/"eval") and one metric, in file order."""
    pts = [(r["tokens"], r[key]) for r in records if r.get("kind", "train") == kind and r.get(key) is not None]
    return [t for t, _ in pts], [v for _, v in pts]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise InputError("plotting needs matplotlib, which is not installed (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def run(args: argparse.Namespace) -> int:
    from megatron_prune.train.metrics import read_metrics

    paths = [_metrics_path(m) for m in args.metrics]
    labels = args.labels or legend_labels(paths)
    if len(labels) != len(paths):
        raise InputError(f"{len(labels)} labels for {len(paths)} metrics files")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = 0
    for path, label in zip(paths, labels):
        records = read_metrics(path)
        for kind, key, style, suffix in (("train", "lm_loss", "-", ""), ("eval", "lm_loss", "--", " (valid)"),
                                         ("train", "kd_loss", ":", " (KD)")):
            x, y = series(records, kind, key)
            if x:
                ax.plot(x, y, style, marker="o" if kind == "eval" else None, markersize=3, label=label + suffix)
                drawn += 1
    if not drawn:
        raise InputError(f"no loss records in {', '.join(map(str, paths))}")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss")
    ax.set_title(args.title)
    if args.logx:
        ax.set_xscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    plt.close(fig)
    print(f"wrote {args.out} ({drawn} curves from {len(paths)} files)")
    return 0
