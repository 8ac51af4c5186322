"""Run the compress job: every stage in order, skipping those already done with today's fingerprint; from the
first one that is not, every later stage runs again. Progress is one line per stage start and end, and the
stage's own output streamed live. The train stage keeps its partial output: `train` resumes from its --save."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from megatron_prune.compress.plan import Stage
from megatron_prune.compress.runner import cli_command, last_json, run_command
from megatron_prune.compress.state import (MARKER, changed_options, fingerprint, read_marker, started_fingerprint,
                                           write_marker, write_started)

# Thread counts fixed per process: a kernel's reduction order may follow the thread count, and a resumed
# training run must compute what an uninterrupted one does (the user's own setting wins).
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def say(text: str) -> None:
    print(f"[compress] {text}", file=sys.stderr, flush=True)


def run_stages(stages: list[Stage], out: Path) -> list[dict]:
    """Run or skip every stage; return their records (stage.json contents) in order."""
    import os

    env = {k: os.environ.get(k, v) for k, v in THREADS.items()}
    records, upstream, redo, t0 = [], "", False, time.perf_counter()
    for i, stage in enumerate(stages):
        stage_dir = out / "stages" / stage.dir_name
        fp = fingerprint(stage, upstream)
        old = read_marker(stage_dir)
        if not redo and old is not None and old.get("fingerprint") == fp:
            say(f"{stage.name}: done before, kept ({stage_dir})")
        else:
            if old is not None and not redo:
                say(f"{stage.name}: changed since the last run ({changed_options(old, stage)}): redoing it and the "
                    f"{len(stages) - i - 1} stages after it")
            # a partial output is resumed only by the first stage to run: after it, every input is new
            keep = stage.resumable and not redo and _started(stage_dir) == fp
            redo = True
            old = _run_stage(stage, stage_dir, fp, out, env, keep=keep, t0=t0)
        records.append(old)
        upstream = fp
    return records


def _started(stage_dir: Path) -> str | None:
    """The fingerprint an unfinished run of this stage started with: its partial output is resumed only when the
    stage is the same one (same commands, same upstream)."""
    return started_fingerprint(stage_dir)


def _run_stage(stage: Stage, stage_dir: Path, fp: str, out: Path, env: dict, keep: bool, t0: float) -> dict:
    if stage_dir.exists() and not keep:  # a changed or unfinished stage starts afresh (train resumes instead)
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    if keep:
        say(f"{stage.name}: resuming its unfinished run in {stage_dir}")
    (stage_dir / MARKER).unlink(missing_ok=True)
    write_started(stage_dir, fp)
    say(f"{stage.name}: start (job at {time.perf_counter() - t0:.1f} s)")
    start, peak, results = time.perf_counter(), 0, []
    if stage.kind == "publish":
        _publish(Path(stage.publish), out)
    for cmd in stage.commands:
        launch = (["--nproc", str(cmd.nproc)] if cmd.nproc else []) if cmd.torchrun else None
        done = run_command(cli_command(list(cmd.args), prelaunch=launch), env, stage_dir / "log.txt", stream=True)
        peak = max(peak, done.peak_rss)
        if "--json" in cmd.args:
            results.append({"label": cmd.label, **last_json(done.stdout)})
    seconds = time.perf_counter() - start
    record = {"name": stage.name, "kind": stage.kind, "fingerprint": fp, "seconds": round(seconds, 3),
              "peak_rss_bytes": peak, "outputs": stage.outputs, "commands": [list(c.args) for c in stage.commands],
              "results": results}
    write_marker(stage_dir, record)
    say(f"{stage.name}: done in {seconds:.1f} s (job at {time.perf_counter() - t0:.1f} s)")
    return record


def _publish(exported: Path, out: Path) -> None:
    """OUT/hf: a copy of the exported recovered model, put in place by one rename."""
    from megatron_prune.checkpoint.atomic import fsync_tree, swap_into_place, temp_name

    final = out / "hf"
    tmp = out / temp_name("hf")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(exported, tmp)
    fsync_tree(tmp)
    swap_into_place(tmp, final)
