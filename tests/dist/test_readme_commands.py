"""Every runnable command of README.md (its ```bash blocks, see tests/readme_commands.py) runs as written after the
quick demo: from the repository root, in a shell whose PATH lacks the venv and that sets no PYTHON, in README
order (later lines use what earlier ones wrote). The demo's output is a fresh `demo_out`: the commands run in a
folder that holds links to this checkout's files and `demo_out` -> the quick demo's output, so nothing is written
into the checkout. `make` lines are the preconditions (`make demo`, `make test`) and are checked, not rerun."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.readme_commands import commands, problems

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.dist, pytest.mark.slow, pytest.mark.timeout(0)]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A folder like the repository root after `make demo`: links to the checkout, `demo_out` from the quick demo."""
    root = tmp_path_factory.mktemp("readme")
    out = root / "demo_out"
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8"}
    proc = subprocess.run(["bash", str(REPO / "scripts/demo.sh"), "--quick", "--out", str(out)], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("scripts", "tools", "megatron_prune", "benchmarks", "docs", "docker", "tests", ".venv", "Makefile",
                 "README.md", "pyproject.toml"):
        if (REPO / name).exists():
            (root / name).symlink_to(REPO / name)
    return root


def test_readme_commands_run_as_written(checkout):
    runnable = [c for c in commands() if c.runnable and not c.text.startswith("make ")]
    assert runnable
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8"}
    failed = []
    for cmd in runnable:
        assert not problems(cmd), problems(cmd)
        t0 = time.perf_counter()
        res = subprocess.run(["bash", "-c", cmd.text], cwd=checkout, env=env, capture_output=True, text=True)
        print(f"{time.perf_counter() - t0:6.1f} s  rc {res.returncode}  {cmd}", file=sys.stderr)
        if res.returncode:
            failed.append(f"{cmd}\n  exit {res.returncode}: {res.stderr.strip()[-2000:]}")
    assert not failed, "\n".join(failed)
