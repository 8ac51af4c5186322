"""GPU proof kit: our whole GPU path in one prepared run of a few minutes on a bare single-GPU machine.

    make gpu-wheels                            # beforehand, where a package registry is reachable
    bash benchmarks/gpu_proof.sh               # on the GPU machine (Python 3.12 + a CUDA torch, no registry)
    bash benchmarks/gpu_proof.sh --dry-run     # on CPU: wheels present (if the folder exists), stages parse

Stages run as subprocesses in order of value, each under a time limit cut to the budget that is left
(--budget-s, counted from the shell script's start): a failed stage is recorded and the next one runs, unless it
needs the failed one. After every stage the results file (markdown, the raw JSON at the end) is rewritten, so a
run stopped early still leaves what it measured. Per-stage logs go beside it.

Stages: offline install of the wheels; environment (device, bf16 peak, Transformer Engine); random HF models
(tiny, and a ~1.1B LLaMA of TinyLlama's shape); conversion; logits of the tiny model on CUDA against HF
transformers on CUDA and against the CPU (fp32, <= 1e-4); bf16 training of the ~1.1B model at sequence 4096
(local spec, then the Transformer Engine spec when it imports): tokens/s, TFLOP/s, MFU; a TP=1 activation prune;
a distillation (KD) run from the unpruned teacher that saves a checkpoint.
Internal tasks (`python benchmarks/gpu_proof.py TASK --help`): env, make-models, parity, gather-wheels.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
# what runs inside the stages, and the dry run
from gpu_proof_tasks import BIG, PRUNE_TARGET, TASKS, dry_run, run_task  # noqa: E402,F401

NO_TE = "Transformer Engine does not import"


@dataclass
class Stage:
    name: str
    argv: list[str]
    timeout: int
    needs: tuple[str, ...] = ()
    numbers: Callable[[str, Path], dict] | None = None   # (stdout, work dir) -> numbers for the results
    requires_te: bool = False


@dataclass
class Outcome:
    name: str
    status: str                 # ok | failed | skipped
    seconds: float = 0.0
    command: str = ""
    numbers: dict = field(default_factory=dict)
    note: str = ""


# ------------------------------------------------------------------------------------------------ the plan
def _torchrun(py: str) -> list[str]:
    return [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]


def _train_argv(py: str, work: Path, name: str, load: Path, seq: int, mbs: int, gbs: int, iters: int,
                extra: list[str]) -> list[str]:
    return [*_torchrun(py), "-m", "megatron_prune", "train", "--load", str(load),
            "--data-path", str(work / "data" / "train_text_document"), "--split", "99,1,0",
            "--data-cache-path", str(work / "data" / "cache"), "--seq-length", str(seq),
            "--micro-batch-size", str(mbs), "--global-batch-size", str(gbs), "--train-iters", str(iters),
            "--lr", "1e-4", "--min-lr", "1e-5", "--bf16", "--eval-iters", "0", "--log-interval", "1",
            "--metrics-file", str(work / f"{name}.jsonl"), *([] if "--save" in extra else ["--no-save"]), *extra]


def plan(opts: argparse.Namespace) -> list[Stage]:
    py, work, me = opts.python, Path(opts.work), str(Path(__file__).resolve())
    big, tiny, pruned = work / "big-mg", work / "tiny-mg", work / "big-pruned"
    peak = ["--peak-tflops", str(opts.peak_tflops)] if opts.peak_tflops else []
    layers = opts.layers or BIG["num_hidden_layers"]
    train = dict(seq=opts.seq_length, mbs=opts.micro_batch_size, gbs=opts.global_batch_size, iters=opts.steps)
    train_numbers = lambda name: (lambda out, w: summarize_training(w / f"{name}.jsonl", opts.warmup))  # noqa: E731
    return [
        # -I: neither the checkout (cwd, PYTHONPATH) nor its egg-info may pass for an installed megatron_prune
        Stage("install", [py, "-I", "-m", "pip", "install", "--no-index", "--find-links", str(opts.wheels),
                          "megatron_prune"], 180),
        Stage("env", [py, me, "env"], 90, ("install",), numbers=lambda out, w: last_json(out)),
        Stage("models", [py, me, "make-models", "--work", str(work), "--layers", str(layers)], 120, ("env",),
              numbers=lambda out, w: last_json(out)),
        Stage("convert-tiny", [py, "-m", "megatron_prune", "convert", "hf-to-megatron", "--hf-dir",
                               str(work / "tiny-hf"), "--save", str(tiny), "--tp", "1", "--no-progress"], 90,
              ("models",)),
        Stage("parity", [py, me, "parity", "--work", str(work)], 180, ("convert-tiny",),
              numbers=lambda out, w: last_json(out)),
        Stage("convert-big", [py, "-m", "megatron_prune", "convert", "hf-to-megatron", "--hf-dir",
                              str(work / "big-hf"), "--save", str(big), "--tp", "1", "--dtype", "bf16",
                              "--no-progress"], 180, ("models",)),
        Stage("preprocess", [py, "-m", "megatron_prune", "preprocess", "--input",
                             str(ROOT / "megatron_prune" / "data" / "samples" / "train.jsonl"), "--tokenizer",
                             str(work / "big-hf"), "--output-prefix", str(work / "data" / "train"),
                             "--append-eod", "--workers", "4", "--no-progress"], 90, ("models",)),
        Stage("train-local", _train_argv(py, work, "train-local", big, **train, extra=peak), 240,
              ("convert-big", "preprocess"), numbers=train_numbers("train-local")),
        Stage("train-te", _train_argv(py, work, "train-te", big, **train, extra=[*peak, "--use-te"]), 240,
              ("convert-big", "preprocess"), numbers=train_numbers("train-te"), requires_te=True),
        Stage("prune", [*_torchrun(py), "-m", "megatron_prune", "prune", "--load", str(big), "--save", str(pruned),
                        "--importance", "activation", "--hidden-size-remain", str(PRUNE_TARGET["hidden"]),
                        "--num-attention-heads-remain", str(PRUNE_TARGET["heads"]), "--ffn-hidden-size-remain",
                        str(PRUNE_TARGET["ffn"]), "--num-layers-remain", str(max(1, layers * 3 // 4)),
                        "--calib-samples", "32", "--calib-seq-length", str(min(1024, opts.seq_length)),
                        "--no-progress", "--json"], 240,
              ("convert-big",), numbers=lambda out, w: prune_numbers(last_json(out))),
        Stage("kd", _train_argv(py, work, "kd", pruned, seq=min(2048, opts.seq_length), mbs=1, gbs=2, iters=3,
                                extra=[*peak, "--teacher-load", str(big), "--kd-alpha", "1.0",
                                       "--save", str(work / "kd-out")]), 240,
              ("prune", "preprocess"), numbers=lambda out, w: summarize_training(w / "kd.jsonl", 0)),
    ]


# ------------------------------------------------------------------------------------------------ results
def last_json(stdout: str) -> dict:
    """The last line of a stage's stdout that is a JSON object (how tasks report their numbers)."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            return json.loads(line)
    return {}


def summarize_training(metrics: Path, warmup: int) -> dict:
    """Medians over the train records after `warmup` iterations (log interval 1: one record per step)."""
    recs = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    recs = [r for r in recs if r.get("kind") == "train"]
    timed = [r for r in recs if r["iteration"] > warmup] or recs
    med = lambda key: statistics.median(r[key] for r in timed) if all(key in r for r in timed) else None  # noqa
    out = {"steps_timed": len(timed), "tokens_per_s": med("tokens_per_s"), "tflops_per_device":
           med("tflops_per_device"), "mfu": med("mfu"), "step_time_s": med("step_time_s"),
           "lm_loss_first": recs[0].get("lm_loss"), "lm_loss_last": recs[-1].get("lm_loss"),
           "kd_loss_last": recs[-1].get("kd_loss"),
           "mem_max_allocated_gib": max((r.get("mem_max_allocated_gib", 0.0) for r in recs), default=None)}
    return {k: v for k, v in out.items() if v is not None}


def prune_numbers(summary: dict) -> dict:
    t = summary.get("target", {})
    keys = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size")
    out = {"seconds_total": summary.get("seconds", {}).get("total"), **{k: t[k] for k in keys if k in t}}
    if t:
        from megatron_prune.config.shape import LlamaShape

        out["params_after"] = LlamaShape.from_dict(t).num_params()
    return {**out, "summary": summary}


def render(outcomes: list[Outcome], header: dict) -> str:
    lines = ["# GPU proof kit: results", "", f"Command: `{header['command']}`  ", f"Started: {header['started']}; "
             f"total {header['elapsed']:.0f} s of a {header['budget']} s budget.", "",
             "| stage | status | seconds | result |", "|---|---|---:|---|"]
    for o in outcomes:
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in o.numbers.items()
                 if not isinstance(v, (dict, list))}
        result = ", ".join(f"{k} {v}" for k, v in shown.items()) or o.note
        lines.append(f"| {o.name} | {o.status} | {o.seconds:.1f} | {result.replace('|', '/')} |")
    raw = json.dumps({"header": header, "stages": [o.__dict__ for o in outcomes]}, indent=1, default=str)
    return "\n".join(lines + ["", "Raw results:", "", "```json", raw, "```", ""])


# ------------------------------------------------------------------------------------------------ running
def run_stage(st: Stage, budget_left: float, logs: Path, work: Path) -> Outcome:
    cmd = shlex.join(st.argv)
    limit = min(st.timeout, budget_left)
    if limit < 5:
        return Outcome(st.name, "skipped", command=cmd, note="time budget spent")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "8"), "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    log = logs / f"{st.name}.log"
    try:
        proc = subprocess.run(st.argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = None, _text(e.stdout), _text(e.stderr) + f"\n[timed out after {limit:.0f} s]"
    seconds = time.perf_counter() - t0
    log.write_text(f"$ {cmd}\n--- stdout\n{out}\n--- stderr\n{err}\n--- exit {rc}\n")
    tail = (err.strip().splitlines() or out.strip().splitlines() or [""])[-1][:300]
    if rc != 0:
        note = f"timed out after {limit:.0f} s" if rc is None else f"exit {rc}: {tail}"
        return Outcome(st.name, "failed", seconds, cmd, _numbers(st, out, work), note)
    return Outcome(st.name, "ok", seconds, cmd, _numbers(st, out, work))


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def _numbers(st: Stage, out: str, work: Path) -> dict:
    if st.numbers is None:
        return {}
    try:
        return st.numbers(out, work)
    except Exception as e:  # a stage that produced no numbers is reported, not fatal to the run
        return {"numbers_error": f"{type(e).__name__}: {e}"[:200]}


def run_all(opts: argparse.Namespace, stages: list[Stage]) -> int:
    t0 = float(os.environ.get("GPU_PROOF_T0", time.time()))
    out_file, work = Path(opts.out), Path(opts.work)
    logs = out_file.parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    header = {"command": shlex.join(["bash", "benchmarks/gpu_proof.sh", *opts.argv]), "budget": opts.budget_s,
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)), "elapsed": 0.0}
    outcomes: list[Outcome] = []
    for st in stages:
        done = {o.name: o for o in outcomes}
        missing = [n for n in st.needs if n not in done or done[n].status != "ok"]
        te = "env" in done and done["env"].numbers.get("te_ok")
        if missing:
            o = Outcome(st.name, "skipped", command=shlex.join(st.argv), note=f"needs {', '.join(missing)}")
        elif st.requires_te and not te:
            o = Outcome(st.name, "skipped", command=shlex.join(st.argv), note=NO_TE)
        else:
            print(f"[gpu_proof] {st.name} ...", flush=True)
            o = run_stage(st, opts.budget_s - (time.time() - t0), logs, work)
        outcomes.append(o)
        header["elapsed"] = time.time() - t0
        out_file.write_text(render(outcomes, header))
        print(f"[gpu_proof] {o.name}: {o.status} ({o.seconds:.1f} s) {o.note}".rstrip(), flush=True)
    print(render(outcomes, header).split("\nRaw results:")[0])
    print(f"[gpu_proof] results: {out_file}  logs: {logs}")
    return 0 if all(o.status == "ok" or o.note == NO_TE for o in outcomes) else 1


# ------------------------------------------------------------------------------------------------ CLI
def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bash benchmarks/gpu_proof.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU check: wheels (when the folder exists), stages parse")
    p.add_argument("--wheels", default=str(ROOT / "benchmarks" / "gpu_wheels"), help="folder of `make gpu-wheels`")
    p.add_argument("--work", default="/tmp/gpu_proof", help="scratch folder for models and data (~15 GB)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "gpu_proof" / "results.md"),
                   help="the results file (logs go to logs/ beside it)")
    p.add_argument("--python", default=sys.executable, help="interpreter for every stage")
    p.add_argument("--budget-s", type=int, default=345, help="wall-time budget of the whole run (default 345)")
    p.add_argument("--steps", type=int, default=10, help="training iterations per spec (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="iterations left out of the throughput (default 2)")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--layers", type=int, default=None, help="layers of the big model (default 22: ~1.1B)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="bf16 dense peak of this GPU (default: looked up by device name)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TASKS:
        return run_task(argv[0], argv[1:])
    if argv and argv[0] == "run":
        argv = argv[1:]
    opts = run_parser().parse_args(argv)
    opts.argv = argv
    if opts.dry_run:
        return dry_run(opts, plan(opts))
    return run_all(opts, plan(opts))


if __name__ == "__main__":
    sys.exit(main())
