"""Run the compress job: every stage in order, skipping those already done with today's fingerprint; from the
first one that is not, every later stage runs again. Progress is one line per stage start and end, the stage's own
output streamed live (indented) and a heartbeat when a stage is silent (compress/terminal.py). The train stage
keeps its partial output: `train` resumes from its --save. The demo runs its recipe through this same job."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from megatron_prune.compress.plan import Stage
from megatron_prune.compress.runner import StageError, cli_command, last_json, run_command
from megatron_prune.compress.terminal import Terminal
from megatron_prune.compress.state import (MARKER, changed_options, fingerprint, read_marker, started_fingerprint,
                                           write_marker, write_started)

# Thread counts fixed per process: a kernel's reduction order may follow the thread count, and a resumed
# training run must compute what an uninterrupted one does (the user's own setting wins).
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# compress's own lines and its stages' output go to stderr: stdout stays free for what a caller pipes
TERMINAL = Terminal("compress", stream=sys.stderr)


def say(text: str) -> None:
    TERMINAL.job(text)


def run_job(recipe, env: dict[str, str] | None = None, terminal: Terminal | None = None,
            until: str | None = None) -> tuple[list[dict], dict | None]:
    """The whole job of `recipe`: its stages built and every one checked before the first runs, the output
    locked, the recipe written, the stages run (or kept); then report.json / report.md and loss.png. With `until`
    (a stage kind, e.g. "convert") only the stages up to the first of that kind run, and there is no report.
    Returns (the stage records, the report)."""
    from megatron_prune.checkpoint.lock import output_lock
    from megatron_prune.compress.checks import check_job, source_shape, train_data_kinds
    from megatron_prune.compress.plan import build_stages
    from megatron_prune.compress.recipe import write_recipe
    from megatron_prune.errors import UserError

    stages = build_stages(recipe, source_shape(recipe.hf_dir).num_params(), train_data_kinds(recipe))
    check_job(recipe, stages)
    if until is not None:
        stages = stages[:next(i for i, s in enumerate(stages) if s.kind == until) + 1]
    out = Path(recipe.save)
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out, inside=True):
        write_recipe(recipe, out / "recipe.yaml")
        try:
            records = run_stages(stages, out, env, terminal)
        except StageError as e:
            first = str(e).splitlines()[0]
            raise UserError(f"{first} (its output is above; rerun the same command to continue)") from None
        report = None if until is not None else _finish(records, out, env)
    return records, report


def _finish(records: list[dict], out: Path, env: dict[str, str] | None) -> dict:
    from megatron_prune.compress.report import build_report, metrics_files, write_report

    report = build_report(records, out)
    png = out / "loss.png"
    try:
        labels = [r["name"] for r in records if r["kind"] == "train"]  # "05-train", or one per round
        run_command(cli_command(["plot", *metrics_files(records), "--labels", *labels, "--out", str(png), "--title",
                                 "recovery training"]), env)
        report["loss_png"] = str(png)
    except StageError as e:  # no matplotlib: the report without the picture
        print(f"warning: no loss.png: {str(e).splitlines()[-1]}", file=sys.stderr)
    write_report(report, out)
    return report


def default_env() -> dict[str, str]:
    import os

    return {k: os.environ.get(k, v) for k, v in THREADS.items()}


def run_stages(stages: list[Stage], out: Path, env: dict[str, str] | None = None,
               terminal: Terminal | None = None) -> list[dict]:
    """Run or skip every stage; return their records (stage.json contents) in order. `env`: the environment every
    command gets on top of os.environ (default: THREADS, the user's own setting winning); `terminal`: where
    progress goes (default: compress's, on stderr)."""
    job = _Job(out, default_env() if env is None else env, terminal or TERMINAL)
    records, upstream, redo = [], "", False
    for i, stage in enumerate(stages):
        stage_dir = out / "stages" / stage.dir_name
        fp = fingerprint(stage, upstream)
        old = read_marker(stage_dir)
        if not redo and old is not None and old.get("fingerprint") == fp:
            job.term.job(f"{stage.name}: done before, kept ({stage_dir})")
        else:
            if old is not None and not redo:
                job.term.job(f"{stage.name}: changed since the last run ({changed_options(old, stage)}): redoing "
                             f"it and the {len(stages) - i - 1} stages after it")
            # a partial output is resumed only by the first stage to run: after it, every input is new
            keep = stage.resumable and not redo and started_fingerprint(stage_dir) == fp
            redo = True
            old = job.run(stage, stage_dir, fp, keep=keep)
        records.append(old)
        upstream = fp
    return records


class _Job:
    def __init__(self, out: Path, env: dict[str, str], term: Terminal):
        self.out, self.env, self.term, self.t0 = out, env, term, time.perf_counter()

    def clock(self) -> str:
        return f"job at {time.perf_counter() - self.t0:.1f} s"

    def run(self, stage: Stage, stage_dir: Path, fp: str, keep: bool) -> dict:
        """Run one stage's commands (a changed or unfinished stage starts afresh; train resumes instead) and
        write its record last."""
        if stage_dir.exists() and not keep:
            shutil.rmtree(stage_dir)
        stage_dir.mkdir(parents=True, exist_ok=True)
        if keep:
            self.term.job(f"{stage.name}: resuming its unfinished run in {stage_dir}")
        (stage_dir / MARKER).unlink(missing_ok=True)
        write_started(stage_dir, fp)
        start, peak, results = time.perf_counter(), 0, []
        with self.term.stage(stage.name, opening=f"{stage.name}: start ({self.clock()})"):
            if stage.kind == "publish":
                _publish(Path(stage.publish), self.out)
            for cmd in stage.commands:
                launch = (["--nproc", str(cmd.nproc)] if cmd.nproc else []) if cmd.torchrun else None
                done = run_command(cli_command(list(cmd.args), prelaunch=launch), self.env, stage_dir / "log.txt",
                                   self.term)
                peak = max(peak, done.peak_rss)
                if "--json" in cmd.args:
                    results.append({"label": cmd.label, **last_json(done.stdout)})
        seconds = time.perf_counter() - start
        record = {"name": stage.name, "kind": stage.kind, "fingerprint": fp, "seconds": round(seconds, 3),
                  "peak_rss_bytes": peak, "outputs": stage.outputs,
                  "commands": [list(c.args) for c in stage.commands], "results": results}
        write_marker(stage_dir, record)
        self.term.job(f"{stage.name}: done in {seconds:.1f} s ({self.clock()})")
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
