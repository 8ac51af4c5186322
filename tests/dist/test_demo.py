"""The demo, end to end: `bash scripts/demo.sh --quick`, as a user runs it.

Two runs: the default (SmolLM2-135M from PyPI, or the tiny fallback when the package registry cannot be
reached; 192 s on the busy 2-core machine) and, marked slow (`make test-all`), the self-trained tiny LLaMA. Each
checks what the demo claims: megatron-core and HF transformers agree on the unpruned model, the round trip is
bit-exact, pruning hurts, recovery training clearly lowers held-out perplexity again, and the exported HF model
scores what the Megatron checkpoint scores.

The time limit is not a constant: it scales with how long a fixed reference workload takes on this machine at this
moment (a Python process start importing torch and transformers, and fp32 matmuls: what the demo's stages are made
of), so a machine twice as slow or twice as busy gets twice the limit.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# pytest-timeout's fixed limit is off here (0): run_demo's limit scales with the machine's measured speed.
pytestmark = [pytest.mark.dist, pytest.mark.timeout(0)]

# Measured back to back on the shared 2-core CPU machine: the quick demo with SmolLM2 not yet cached took 253 s
# while reference_seconds() gave 3.8 s (ratio 67); the tiny-model run takes about 1.2x the default one. The limit
# allows HEADROOM times the larger ratio.
DEMO_PER_REF = 80.0
HEADROOM = 2.5


def reference_seconds() -> float:
    """Median wall time of a fixed workload shaped like the demo's stages: start a Python process that imports
    torch and transformers' LLaMA, then 20 fp32 1024x1024 matmuls on all cores."""
    import torch

    a = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch, transformers.models.llama"], check=True)
        for _ in range(20):
            a @ a
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def demo_limit(reference: float) -> float:
    return HEADROOM * DEMO_PER_REF * reference


def test_demo_limit_scales_with_the_reference_step():
    """A machine twice as slow (the reference takes twice as long) gets twice the limit."""
    assert demo_limit(2 * 5.0) == 2 * demo_limit(5.0)
    assert demo_limit(3.8) >= HEADROOM * 253  # the calibration run: 253 s while the reference took 3.8 s


def run_demo(out: Path, *args: str) -> dict:
    """Run the quick demo as a user does, reading its terminal output (stdout and stderr) line by line as it
    comes; check the claims it prints progress all along, and return its demo_results.json."""
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out)}
    ref = reference_seconds()
    limit = demo_limit(ref)
    print(f"reference step {ref:.2f} s -> demo limit {limit:.0f} s")
    proc = subprocess.Popen(["bash", str(REPO / "scripts" / "demo.sh"), "--quick", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killer = threading.Timer(limit, proc.kill)
    killer.start()
    start, lines = time.monotonic(), []
    try:
        for line in proc.stdout:
            lines.append((time.monotonic() - start, line.rstrip("\n")))
        returncode = proc.wait()
    finally:
        killer.cancel()
    text = "\n".join(line for _, line in lines)
    print(text[-6000:])
    assert returncode == 0, f"demo failed (exit {returncode}; killed past the {limit:.0f} s limit when -9):\n" \
        f"{text[-4000:]}"
    res = json.loads((out / "demo_results.json").read_text())
    check_progress(lines, out, res["recovery"]["kd"]["iterations"])
    return res


# Acceptance (issue 24): the terminal shows progress at least every 30 s of every stage.
MAX_GAP_S = 30.0


def check_progress(lines: list[tuple[float, str]], out: Path, iters: int) -> None:
    """The demo streams each stage's own progress and is never silent for long.

    Why this is robust on a slow or busy machine: the gap bound is wall-clock, but what keeps it is the demo's
    heartbeat (megatron_prune/compress/terminal.py), a "still running: STAGE, N s" line after HEARTBEAT_S = 10 s
    without output, timed by the clock, not by work done. A machine 2x slower makes stages longer, not their
    silences: the heartbeat still fires 10 s into each. MAX_GAP_S = 30 s is 3x that interval; only a demo
    process starved of the CPU for 20 s at a stretch could miss it. A count of work (iterations between lines)
    would not bound silence, since a slow machine stretches each iteration.

    What shows the stages' *own* progress (not only the heartbeat): the demo is compress's job on its recipe, and
    every job stage opens with "[demo] NN-NAME: start (...)" and closes with "[demo] NN-NAME: done in ..."; the
    recovery training's per-iteration lines (log interval 2) appear on the terminal while the stage runs, before
    its closing line; the conversion, pruning, export and megatron-core evaluation stages stream their own
    (indented) lines between opening and closing; and the end names the report, the log (the terminal's
    transcript) and the plot."""
    times = [0.0] + [t for t, _ in lines]
    gaps = [(b - a, line) for a, b, (_, line) in zip(times, times[1:], lines)]
    worst, after = max(gaps)
    print(f"longest silence of the terminal: {worst:.1f} s, before {after!r}")
    assert worst <= MAX_GAP_S, f"{worst:.0f} s without output before: {after!r}"
    text = [line for _, line in lines]

    def stage(name: str) -> list[str]:
        """The lines job stage `name` printed between its opening and closing lines."""
        opening = text.index(next(line for line in text if line.startswith(f"[demo] {name}: start (")))
        closing = next(i for i in range(opening + 1, len(text)) if text[i].startswith(f"[demo] {name}: done in "))
        return text[opening + 1:closing]

    train = stage("05-train")
    logged = [line for line in train if re.match(r"\s+train iter +\d+", line)]
    assert len(logged) == iters // 2, train
    for name in ("01-convert", "03-prune", "06-export", "07-eval"):
        own = [line for line in stage(name) if line.startswith("    ")]
        assert own, f"stage {name!r} streamed none of its own output: {stage(name)}"
    tail = "\n".join(text[-6:])
    for name in ("demo_report.md", "demo.log", "loss_curve.png"):
        assert str(out / name) in tail, tail
    log = (out / "demo.log").read_text()
    assert all(line in log for line in logged)
    assert all(line.strip() in (out / "compress" / "stages" / "05-train" / "log.txt").read_text() for line in logged)


def check_claims(res: dict, out: Path) -> None:
    assert abs(res["megatron"]["loss"] - res["hf"]["loss"]) < 1e-4
    same, total = res["identical_tensors"]
    assert same == total > 0
    rec = res["recovery"]
    teacher, pruned, recovered = res["megatron"]["perplexity"], rec["pruned"]["perplexity"], \
        rec["recovered"]["perplexity"]
    assert pruned > 1.5 * teacher, (teacher, pruned)
    assert recovered < 0.7 * pruned, f"recovery did not clearly help: {pruned:.2f} -> {recovered:.2f}"
    assert abs(rec["recovered_hf"]["loss"] - rec["recovered"]["loss"]) < 1e-4
    assert rec["prune"]["params_after"] < 0.75 * rec["prune"]["params_before"]
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert "| original (teacher) |" in (out / "demo_report.md").read_text()


@pytest.mark.slow
def test_demo_quick_tiny_model(tmp_path):
    out = tmp_path / "demo"
    res = run_demo(out, "--model", "tiny", "--cache", str(tmp_path / "cache"))
    assert res["model"].startswith("tiny LLaMA trained here")
    check_claims(res, out)


def test_demo_quick_default_model(tmp_path):
    out = tmp_path / "demo"
    res = run_demo(out)
    print(f"demo model: {res['model']}")
    check_claims(res, out)
