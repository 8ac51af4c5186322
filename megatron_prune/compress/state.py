"""Which stages are done: each finished stage leaves STAGE_DIR/stage.json (written last, atomically) with a
fingerprint of its commands, of the stages before it, and of the outside files it reads (size and mtime). A stage
is done when that file exists and its fingerprint is today's."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from megatron_prune.compress.plan import Stage

MARKER = "stage.json"
STARTED = "started.json"   # written when a stage starts: which fingerprint its partial output belongs to


def fingerprint(stage: Stage, upstream: str) -> str:
    """sha256 over the commands, the previous stage's fingerprint and the outside inputs' sizes and mtimes."""
    body = {"name": stage.name, "commands": [[list(c.args), c.torchrun, c.nproc] for c in stage.commands],
            "upstream": upstream, "publish": stage.publish, "inputs": [_identity(Path(p)) for p in stage.inputs]}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _identity(path: Path) -> list:
    """Size and mtime of a file, or of every file under a directory (sorted)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    out = []
    for p in files:
        try:
            st = p.stat()
            out.append([str(p), st.st_size, st.st_mtime_ns])
        except FileNotFoundError:
            out.append([str(p), None, None])
    return out


def read_marker(stage_dir: Path) -> dict | None:
    try:
        return json.loads((stage_dir / MARKER).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_marker(stage_dir: Path, record: dict) -> None:
    from megatron_prune.checkpoint.atomic import atomic_write_text

    atomic_write_text(stage_dir / MARKER, json.dumps(record, indent=1) + "\n")


def write_started(stage_dir: Path, fp: str) -> None:
    from megatron_prune.checkpoint.atomic import atomic_write_text

    atomic_write_text(stage_dir / STARTED, json.dumps({"fingerprint": fp}) + "\n")


def started_fingerprint(stage_dir: Path) -> str | None:
    try:
        return json.loads((stage_dir / STARTED).read_text())["fingerprint"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None


def changed_options(old: dict, stage: Stage) -> str:
    """'--train-iters 2 -> 3' for the options that differ between a stage's recorded and today's commands."""
    before = [_options(a) for a in old.get("commands", [])]
    after = [_options(list(c.args)) for c in stage.commands]
    diffs = []
    for b, a in zip(before, after):
        for key in sorted(set(b) | set(a)):
            if b.get(key) != a.get(key):
                diffs.append(f"{key} {b.get(key, '(unset)')} -> {a.get(key, '(unset)')}")
    if len(before) != len(after):
        diffs.append("the commands")
    return ", ".join(diffs) or "its inputs"


def _options(args: list[str]) -> dict[str, str]:
    out, key = {}, None
    for a in args:
        if a.startswith("--"):
            key = a
            out[key] = ""
        elif key is not None:
            out[key] = f"{out[key]} {a}".strip()
    return out


def stage_dirs_exist(path: Path) -> bool:
    return path.exists() and any(os.scandir(path))
