"""compress on SmolLM2-135M: one-shot vs iterative pruning at equal training tokens, and compress's overhead over
running its stages by hand.

    python benchmarks/compress_bench.py --work /tmp/cbench          # steps 1, 2, 3 + the overhead (hours on 2 cores)
    python benchmarks/compress_bench.py --work /tmp/cbench --render # RESULTS.md from what /tmp/cbench holds
    python benchmarks/compress_bench.py --work /tmp/cbench-smoke --iters 2 --eval-tokens 512 --steps 1 \\
        --prune-args "--calib-samples 16 --search-candidates 2" --no-write            # a smoke run

(a) `compress --target-params 50% --tp 3 --train-tp 1 --nproc 2` with --steps 1, 2 and 3 and the same --iters in
all (split over the rounds: K rounds read the same token stream as one run, each round after the previous
rounds' samples; later rounds' drop limits are measured from the original, `prune --limits-of`). SmolLM2 has
3 query groups: conversion and the first prune at TP 3, training (2 data-parallel ranks) and later rounds at TP 1.
Training: the demo's distillation recipe (megatron_prune/demo/stages.py: KD alpha 0.5, temperature 2, AdamW lr 5e-4
cosine to 5e-5, fp32, seed 1234, global batch 8 x 128 tokens, micro-batch 4); each round warms up for a tenth of
its iterations (at least 1; none in a one-iteration round). SmolLM2 comes from the demo's cache (fetched when
absent, as `make demo` does). Calibration and training: the shipped
train.jsonl; every model is evaluated on the first --eval-tokens of heldout.jsonl in sequences of the training
length, 128 (never calibrated or trained on; the demo evaluates in windows of 512, so its perplexities are lower).
"pruned" is the model right after the last round's prune (for K > 1 it has had K - 1 rounds of training).
(b) The --steps 1 run's stage commands (OUT/stages/*/stage.json "commands", the exact CLI argument lists) run again
by hand in a fresh directory (paths rewritten to it), one after the other, each as a user types it (`python -m
megatron_prune ...`; the torchrun stages through cli/prelaunch.py, as the shell scripts do), with the thread
settings compress used: compress's wall time over the sum of theirs (target <= 1.05).

--work keeps every finished run (WORK/steps-K, WORK/by-hand, their wall times in WORK/results.json) and reuses it
when its settings are unchanged; an unfinished one (interrupted) starts afresh, so that every wall time is one
uninterrupted run. Results go to benchmarks/RESULTS.md between `<!-- compress-bench -->` markers (--no-write:
print only).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.common import recovery_parser, write_section  # noqa: E402

SAMPLES = REPO / "megatron_prune" / "data" / "samples"
CACHE = Path.home() / ".cache" / "megatron_prune"
SECTION = "compress-bench"
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}   # compress's own default (compress/job.py THREADS)
SEQ, GBS, MICRO, NPROC = 128, 8, 4, 2


def log_step(msg: str) -> None:
    print(f"[compress-bench] {msg}", flush=True)


class Results:
    """WORK/results.json: each finished run's settings and wall time."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def done(self, name: str, settings: dict) -> dict | None:
        entry = self.data.get(name)
        return entry if entry is not None and entry["settings"] == settings else None

    def put(self, name: str, entry: dict) -> None:
        self.data[name] = entry
        self.path.write_text(json.dumps(self.data, indent=1) + "\n")


def train_args(iters_per_round: int) -> list[str]:
    """The demo's recovery recipe (DemoPlan), its warm-up a tenth of the round (at least 1, none in a round of one
    iteration: the warm-up must be shorter than the round)."""
    warmup = max(1, iters_per_round // 10) if iters_per_round > 1 else 0
    return ["--kd-alpha", "0.5", "--kd-temperature", "2", "--lr", "5e-4", "--min-lr", "5e-5", "--lr-warmup-iters",
            str(warmup), "--split", "98,2,0", "--seed", "1234", "--fp32", "--log-interval", "2"]


def compress_args(args, hf: Path, out: Path, steps: int) -> list[str]:
    return ["compress", "--hf-dir", str(hf), "--save", str(out), "--target-params", "50%", "--tp", "3",
            "--train-tp", "1", "--nproc", str(NPROC), "--steps", str(steps),
            "--calib-data", str(SAMPLES / "train.jsonl"), "--train-data", str(SAMPLES / "train.jsonl"),
            "--eval-data", str(SAMPLES / "heldout.jsonl"), "--eval-max-tokens", str(args.eval_tokens),
            "--train-iters", str(args.iters), "--seq-length", str(SEQ), "--global-batch-size", str(GBS),
            "--micro-batch-size", str(MICRO), "--train-args", shlex.join(train_args(args.iters // steps)),
            *(["--prune-args", args.prune_args] if args.prune_args else [])]


def run_logged(cmd: list[str], log: Path) -> float:
    """Wall seconds of `cmd` with compress's thread settings, its output appended to `log`."""
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        t0 = time.perf_counter()
        # this checkout's code first, as the shell scripts do (scripts/lib/env.sh)
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, **THREADS, "PYTHONPATH": path})
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"`{shlex.join(cmd[2:])}` failed (exit {proc.returncode}); its output is in {log}")
    return wall


def run_compress(args, work: Path, results: Results, hf: Path, steps: int) -> dict:
    name, out = f"steps-{steps}", work / f"steps-{steps}"
    cmd = [sys.executable, "-m", "megatron_prune", *compress_args(args, hf, out, steps)]
    settings = {"command": cmd[3:]}
    entry = results.done(name, settings)
    if entry is not None and (out / "report.json").is_file():
        log_step(f"{name}: finished before, kept ({out})")
        return entry
    if out.exists():
        log_step(f"{name}: an unfinished run in {out}: starting it afresh (a wall time is one uninterrupted run)")
        shutil.rmtree(out)
    log_step(f"{name}: compress --steps {steps} (log: {work / (name + '.log')})")
    wall = run_logged(cmd, work / f"{name}.log")
    entry = {"settings": settings, "wall_s": round(wall, 1), "report": json.loads((out / "report.json").read_text())}
    results.put(name, entry)
    log_step(f"{name}: done in {wall:.0f} s")
    return entry


# ---------------------------------------------------------------------------------------------- (b) by hand
def by_hand_commands(job: Path, fresh: Path) -> list[tuple[str, list[str]]]:
    """(stage, command line) of every command compress recorded in `job`, paths moved to `fresh`. The launch of
    each (plain or torchrun, and its process count) is the plan's, from the job's recipe.yaml; the plan rebuilt
    for `fresh` must give exactly the recorded arguments (with the paths moved)."""
    from megatron_prune.compress.checks import source_shape, train_data_kinds
    from megatron_prune.compress.plan import build_stages
    from megatron_prune.compress.recipe import build_recipe
    from megatron_prune.train.config import read_config_file

    recipe = build_recipe(read_config_file(str(job / "recipe.yaml")), {"save": str(fresh)}, "recipe.yaml")
    plan = build_stages(recipe, source_shape(recipe.hf_dir).num_params(), train_data_kinds(recipe))
    out = []
    for stage in plan:
        recorded = json.loads((job / "stages" / stage.name / "stage.json").read_text())["commands"]
        moved = [[_move(a, job, fresh) for a in cmd] for cmd in recorded]
        planned = [list(c.args) for c in stage.commands]
        if moved != planned:
            raise SystemExit(f"{job / 'stages' / stage.name}: recorded commands differ from the plan's:\n"
                             f"{moved}\n{planned}")
        for c in stage.commands:
            if c.torchrun:  # what scripts/lib/env.sh mp_torchrun runs: the checks, then torchrun
                nproc = ["--nproc", str(c.nproc)] if c.nproc else []
                line = [sys.executable, "-m", "megatron_prune.cli.prelaunch", *nproc, "--standalone", "--", *c.args]
            else:
                line = [sys.executable, "-m", "megatron_prune", *c.args]
            out.append((stage.name, line))
    return out


def _move(arg: str, job: Path, fresh: Path) -> str:
    return str(fresh) + arg[len(str(job)):] if arg == str(job) or arg.startswith(str(job) + os.sep) else arg


def run_by_hand(work: Path, results: Results, job: Path) -> dict:
    fresh = work / "by-hand"
    commands = by_hand_commands(job, fresh)
    settings = {"commands": [c for _, c in commands]}
    entry = results.done("by-hand", settings)
    if entry is not None:
        log_step(f"by hand: finished before, kept ({fresh})")
        return entry
    shutil.rmtree(fresh, ignore_errors=True)
    log = work / "by-hand.log"
    log.unlink(missing_ok=True)
    log_step(f"by hand: {len(commands)} commands of {job.name} (log: {log})")
    seconds: dict[str, float] = {}
    for stage, cmd in commands:
        (fresh / "stages" / stage).mkdir(parents=True, exist_ok=True)
        wall = run_logged(cmd, log)
        seconds[stage] = seconds.get(stage, 0.0) + wall
        log_step(f"by hand: {stage}: {' '.join(cmd[cmd.index('--') + 1:] if '--' in cmd else cmd[3:])[:100]} "
                 f"{wall:.1f} s")
    entry = {"settings": settings, "wall_s": round(sum(seconds.values()), 1),
             "stages": {k: round(v, 1) for k, v in seconds.items()}}
    results.put("by-hand", entry)
    return entry


# ---------------------------------------------------------------------------------------------- report
def _m(n: int | str) -> str:
    return f"{int(n) / 1e6:.2f}M"


def render(args, runs: dict[int, dict], by_hand: dict | None) -> str:
    first = next(iter(runs.values()))["report"]
    orig = first["models"]["original"]
    tokens = args.iters * GBS * SEQ
    lines = [
        "## compress: one-shot vs iterative, and its overhead",
        "",
        f"Command: `python benchmarks/compress_bench.py --work DIR{_flags(args)}` (2-core CPU, shared with other "
        f"jobs). SmolLM2-135M-Instruct ({orig['params']:,} parameters, held-out perplexity {orig['perplexity']:.2f}) "
        f"to 50% by `compress --target-params 50% --tp 3 --train-tp 1 --nproc 2 --steps K`: {args.iters} training "
        f"iterations in all ({tokens:,} tokens of the shipped train.jsonl, the same stream for every K), the demo's "
        f"distillation recipe; perplexity on {orig['tokens']:,} tokens of heldout.jsonl (sequences of {SEQ}, the training length). "
        "Round k prunes to P0 x 0.5^(k/K) parameters; 'pruned': right after the last prune (for K > 1 after K - 1 "
        "rounds of training). Wall: the whole job, one uninterrupted run.",
        "",
        "| steps | parameters after each prune (target) | final parameters | pruned ppl | recovered ppl | "
        "held-out loss | wall |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for k, run in runs.items():
        rep = run["report"]
        rounds = ", ".join(f"{_m(r['params'])} ({_target(r['target_params'], orig['params'])})"
                           for r in rep["rounds"])
        rec, pruned = rep["models"]["recovered"], rep["models"]["pruned"]
        lines.append(f"| {k} | {rounds} | {rec['params']:,} | {pruned['perplexity']:.2f} | "
                     f"{rec['perplexity']:.2f} | {rec['loss']:.4f} | {_time(run['wall_s'])} |")
    lines += ["", "Shapes per round: " + "; ".join(
        f"K={k}: " + " -> ".join(r["shape"] for r in run["report"]["rounds"]) for k, run in runs.items())]
    if 1 in runs and by_hand is not None:
        lines += ["", *overhead(runs[1], by_hand)]
    return "\n".join(lines) + "\n"


def overhead(run: dict, by_hand: dict) -> list[str]:
    rep = run["report"]
    stage_sum = sum(s["seconds"] for s in rep["stages"])
    ratio = run["wall_s"] / by_hand["wall_s"]
    rows = [f"| {s['name']} | {s['seconds']:.1f} | {by_hand['stages'].get(s['name'], 0.0):.1f} |"
            for s in rep["stages"]]
    return [f"Overhead (K=1): compress {_time(run['wall_s'])} vs its {len(by_hand['settings']['commands'])} stage "
            f"commands run by hand {_time(by_hand['wall_s'])}: **{ratio:.3f}x** (target <= 1.05). Of compress's "
            f"wall, {stage_sum:.1f} s are its stages' own time (as report.json records it) and "
            f"{run['wall_s'] - stage_sum:.1f} s its checks before the first stage, the loss plot and the report.",
            "", "| stage | compress (s) | by hand (s) |", "|---|---:|---:|", *rows]


def _target(value: str, p0: int) -> str:
    return f"{float(value.rstrip('%')) / 100 * p0 / 1e6:.2f}M" if value.endswith("%") else _m(value)


def _time(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:02.0f} s" if seconds >= 60 else f"{seconds:.1f} s"


def _flags(args) -> str:
    out = "" if args.iters == 60 else f" --iters {args.iters}"
    out += "" if args.eval_tokens == 4096 else f" --eval-tokens {args.eval_tokens}"
    out += "" if args.steps == [1, 2, 3] else f" --steps {' '.join(map(str, args.steps))}"
    return out + (f" --prune-args {shlex.quote(args.prune_args)}" if args.prune_args else "")


# ---------------------------------------------------------------------------------------------- main
def measure(args, work: Path) -> tuple[dict[int, dict], dict | None]:
    from megatron_prune.demo.model_source import fetch_smollm2

    results = Results(work / "results.json")
    hf = fetch_smollm2(CACHE / "smollm2-135m-hf", CACHE)
    runs: dict[int, dict] = {}
    by_hand = None
    for k in args.steps:
        if args.render:
            entry = results.data.get(f"steps-{k}")
            if entry is None:
                continue
            runs[k] = entry
        else:
            runs[k] = run_compress(args, work, results, hf, k)
        if k == 1 and not args.no_overhead:  # by hand right after compress: the same machine load, as far as it goes
            by_hand = results.data.get("by-hand") if args.render else run_by_hand(work, results, work / "steps-1")
    return runs, by_hand


def main() -> int:
    ap = recovery_parser(__doc__, "training iterations in all, split over the rounds (default 60; global batch "
                         "8 x 128 tokens)", eval_tokens=4096)
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3], help="the --steps values to run "
                    "(default 1 2 3); 1 is the one-shot run, also timed by hand")
    ap.add_argument("--prune-args", default="", help="more options of the prune stages, one quoted string "
                    "(default: none, prune's defaults)")
    ap.add_argument("--no-overhead", action="store_true", help="skip (b), the stage commands run by hand")
    ap.add_argument("--render", action="store_true", help="run nothing: the tables from what --work holds")
    args = ap.parse_args()
    if args.render and not args.work:
        ap.error("--render needs --work")
    if any(k < 1 or args.iters < k for k in args.steps):
        ap.error(f"--steps values must be between 1 and --iters ({args.iters})")
    work = Path(args.work or tempfile.mkdtemp(prefix="compress_bench_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        runs, by_hand = measure(args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if not runs:
        raise SystemExit(f"{work}: no finished run to render")
    body = render(args, runs, by_hand)
    print(body)
    if not args.no_write:
        write_section(SECTION, body)
        log_step(f"wrote the {SECTION} section of benchmarks/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
