"""Static checks for what cannot run here (no Docker engine, no Slurm): files exist, shell scripts parse,
the Dockerfile installs what pyproject declares, entry points answer --help."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHELL = sorted([*ROOT.glob("tools/*.sh"), *ROOT.glob("scripts/*.sh"), *ROOT.glob("docker/*"), ROOT / ".ci/run"])


def test_docker_and_slurm_files_exist():
    for rel in ("Dockerfile", "docker/build.sh", "docker/run.sh", "docker/slurm_recovery.sbatch",
                "docker/slurm_compress.sbatch"):
        assert (ROOT / rel).is_file(), rel


@pytest.mark.parametrize("script", SHELL, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    if shutil.which("shellcheck"):
        res = subprocess.run(["shellcheck", "-S", "warning", str(script)], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout


def test_dockerfile_matches_pyproject():
    text = (ROOT / "Dockerfile").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert re.search(r"^FROM nvcr\.io/nvidia/pytorch:\$\{NGC_TAG\}$", text, re.M)
    tag = re.search(r"^ARG NGC_TAG=(\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"\d\d\.\d\d-py3", tag), f"NGC tag must be pinned, got {tag}"
    for src in re.findall(r"^COPY (\S+(?: \S+)*) \S+$", text, re.M):
        for path in src.split():
            assert (ROOT / path).exists(), f"Dockerfile copies missing {path}"
    installs = re.findall(r'pip install -e "\.\[([\w,]+)\]"', text)
    assert installs, "Dockerfile must install this package from pyproject"
    for extra in installs[0].split(","):
        assert extra in project["optional-dependencies"], extra
    assert "pip install torch" not in text, "the NGC image's torch must be kept"


def test_slurm_script_calls_existing_subcommand():
    from megatron_prune.__main__ import SUBCOMMANDS

    text = (ROOT / "docker/slurm_recovery.sbatch").read_text()
    assert "-m megatron_prune train" in text and "train" in SUBCOMMANDS
    assert "--rdzv-backend c10d" in text and "#SBATCH --nodes" in text


def test_ci_runs_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("##", 1)[0]
    commands = re.findall(r"^(make \w+)", quick, re.M)
    assert commands == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci/run").read_text()


def test_cli_help():
    out = subprocess.run([sys.executable, "-m", "megatron_prune", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "convert hf-to-megatron" in out.stdout
    for script in ("tools/hf_to_megatron.sh", "tools/megatron_to_hf.sh"):
        res = subprocess.run(["bash", str(ROOT / script), "--help"], capture_output=True, text=True,
                             env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
        assert res.returncode == 0 and "Environment" in res.stdout and "usage:" in res.stdout, script
