"""The shell entry points as a newcomer runs them after `make demo` / `make test`: from a shell where the venv is
not activated (PATH without .venv/bin, PYTHON unset), with settings given as flags only, as environment variables
only, or both (the flag wins). Outputs are checked through what the written files say (megatron_prune.json, HF
config, safetensors dtypes, token counts), not through the scripts' own messages."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"

pytestmark = pytest.mark.skipif(not VENV_PYTHON.exists(),
                                reason="no .venv at the repository root (`make install` creates it)")


def bare_env(**settings: str) -> dict:
    """A login shell's environment: system PATH only, no PYTHON, no PYTHONPATH, no venv."""
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8",
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.update(settings)
    return env


def run(script: str, *args: str, ok: bool = True, **settings: str) -> subprocess.CompletedProcess:
    res = subprocess.run(["bash", str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                         env=bare_env(**{k: str(v) for k, v in settings.items()}), cwd="/")
    if ok:
        assert res.returncode == 0, f"{script} failed ({res.returncode}):\n{res.stderr[-3000:]}"
    return res


def meta(ckpt: Path) -> dict:
    return json.loads((ckpt / "megatron_prune.json").read_text())


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    from tests.helpers import make_hf_model

    path = tmp_path_factory.mktemp("shell") / "hf"
    make_hf_model(path, num_hidden_layers=2)
    return path


@pytest.fixture(scope="module")
def ckpt_tp2(hf) -> Path:
    from megatron_prune.checkpoint.convert_files import hf_to_megatron

    out = hf.parent / "tp2"
    hf_to_megatron(hf, out, tp=2, pp=1, progress=False)
    return out


def test_helper_finds_the_repository_venv():
    show = 'source scripts/lib/env.sh; echo "$PYTHON"; echo "$PYTHONPATH"'
    res = subprocess.run(["bash", "-c", show], cwd=ROOT, env=bare_env(), capture_output=True, text=True, check=True)
    python, path = res.stdout.splitlines()
    assert python == str(VENV_PYTHON) and path.split(":")[0] == str(ROOT)
    res = subprocess.run(["bash", "-c", show], cwd=ROOT, env=bare_env(PYTHON="/opt/py"), capture_output=True,
                         text=True, check=True)
    assert res.stdout.splitlines()[0] == "/opt/py"


def test_hf_to_megatron(hf, tmp_path):
    run("tools/hf_to_megatron.sh", "--hf-dir", hf, "--save", tmp_path / "flags", "--tp", "2", "--no-progress")
    run("tools/hf_to_megatron.sh", "--no-progress", HF_DIR=hf, SAVE=tmp_path / "env", TP="2")
    run("tools/hf_to_megatron.sh", "--hf-dir", hf, "--save", tmp_path / "both", "--tp", "2", "--no-progress",
        HF_DIR=tmp_path / "missing", SAVE=tmp_path / "wrong", TP="3")
    for name in ("flags", "env", "both"):
        assert meta(tmp_path / name)["tp"] == 2, name
    assert not (tmp_path / "wrong").exists()


def test_missing_input_is_one_line_naming_flag_and_variable(tmp_path):
    res = run("tools/hf_to_megatron.sh", "--tp", "2", ok=False, SAVE=tmp_path / "out")
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("error: the following arguments are required: --hf-dir (or HF_DIR)")


def _hf_dtypes(path: Path) -> set[str]:
    from safetensors import safe_open

    dtypes = set()
    for f in path.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            dtypes |= {str(st.get_slice(k).get_dtype()) for k in st.keys()}
    return dtypes


def test_megatron_to_hf(ckpt_tp2, tmp_path):
    run("tools/megatron_to_hf.sh", "--load", ckpt_tp2, "--save", tmp_path / "flags", "--dtype", "fp16",
        "--no-progress")
    run("tools/megatron_to_hf.sh", "--no-progress", LOAD=ckpt_tp2, SAVE=tmp_path / "env", DTYPE="fp16")
    run("tools/megatron_to_hf.sh", "--load", ckpt_tp2, "--save", tmp_path / "both", "--dtype", "bf16",
        "--no-progress", LOAD=tmp_path / "missing", SAVE=tmp_path / "wrong", DTYPE="fp16")
    assert _hf_dtypes(tmp_path / "flags") == _hf_dtypes(tmp_path / "env") == {"F16"}
    assert _hf_dtypes(tmp_path / "both") == {"BF16"}
    assert not (tmp_path / "wrong").exists()


def test_transfer(ckpt_tp2, tmp_path):
    run("scripts/transfer.sh", "--load", ckpt_tp2, "--save", tmp_path / "flags", "--tp", "1", "--no-progress")
    run("scripts/transfer.sh", "--no-progress", LOAD=ckpt_tp2, SAVE=tmp_path / "env", PP="2")
    run("scripts/transfer.sh", "--load", ckpt_tp2, "--save", tmp_path / "both", "--tp", "1", "--pp", "2",
        "--no-progress", LOAD=tmp_path / "missing", SAVE=tmp_path / "wrong", TP="4", PP="1")
    assert (meta(tmp_path / "flags")["tp"], meta(tmp_path / "flags")["pp"]) == (1, 1)
    assert (meta(tmp_path / "env")["tp"], meta(tmp_path / "env")["pp"]) == (1, 2)  # TP defaults to 1 here
    assert (meta(tmp_path / "both")["tp"], meta(tmp_path / "both")["pp"]) == (1, 2)
    assert not (tmp_path / "wrong").exists()


def _tokens(stdout: str) -> int:
    return int(stdout.split(" sequences, ")[1].split(" tokens")[0])


def test_preprocess(tmp_path):
    from tests.helpers import save_tiny_tokenizer

    tok = save_tiny_tokenizer(tmp_path / "tok")
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"the quick brown fox {i}"}) + "\n" for i in range(5)))
    flags = run("tools/preprocess_data.sh", "--input", docs, "--tokenizer", tok, "--output-prefix",
                tmp_path / "flags", "--workers", "1", "--no-progress")
    env = run("tools/preprocess_data.sh", "--no-progress", INPUT=docs, TOKENIZER=tok,
              OUTPUT_PREFIX=tmp_path / "env", WORKERS="1")
    both = run("tools/preprocess_data.sh", "--input", docs, "--tokenizer", tok, "--output-prefix", tmp_path / "both",
               "--no-append-eod", "--no-progress", INPUT=tmp_path / "missing.jsonl", TOKENIZER=tmp_path / "none",
               OUTPUT_PREFIX=tmp_path / "wrong", WORKERS="1")
    for name in ("flags", "env", "both"):
        assert (tmp_path / f"{name}_text_document.idx").is_file(), name
    assert not list(tmp_path.glob("wrong*"))
    # the script appends EOD by default (APPEND_EOD=1); the --no-append-eod flag wins: one token less per document
    assert _tokens(flags.stdout) == _tokens(env.stdout) == _tokens(both.stdout) + 5


def test_prune(ckpt_tp2, tmp_path):
    """TP comes from the checkpoint (2 processes) unless --tp / TP says it; the flag's sizes win."""
    run("scripts/prune_llama.sh", "--load", ckpt_tp2, "--save", tmp_path / "flags", "--ffn-hidden-size-remain", "48",
        "--no-progress")
    run("scripts/prune_llama.sh", "--no-progress", LOAD=ckpt_tp2, SAVE=tmp_path / "env", TP="2",
        FFN_HIDDEN_SIZE_REMAIN="48")
    run("scripts/prune_llama.sh", "--load", ckpt_tp2, "--save", tmp_path / "both", "--ffn-hidden-size-remain", "64",
        "--tp", "2", "--no-progress", LOAD=tmp_path / "missing", SAVE=tmp_path / "wrong", TP="4",
        FFN_HIDDEN_SIZE_REMAIN="48")
    assert meta(tmp_path / "flags")["shape"]["ffn_hidden_size"] == 48
    assert meta(tmp_path / "env")["shape"]["ffn_hidden_size"] == 48
    assert meta(tmp_path / "both")["shape"]["ffn_hidden_size"] == 64
    assert meta(tmp_path / "both")["tp"] == 2 and not (tmp_path / "wrong").exists()


def test_prune_wrong_tp_is_one_line(ckpt_tp2, tmp_path):
    res = run("scripts/prune_llama.sh", "--load", ckpt_tp2, "--save", tmp_path / "out", "--tp", "4", ok=False)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith(f"error: --tp 4, but {ckpt_tp2} is a tp=2 checkpoint")
    assert not (tmp_path / "out").exists()


def _torchrun_nproc(*args: str, **settings: str) -> int:
    words = run("scripts/train_recovery.sh", *args, DRY_RUN="1", **settings).stdout.split()
    assert "megatron_prune.cli.launch" in words and words[-len(args):] == list(args)  # torchrun, short failures
    return int(words[words.index("--nproc-per-node") + 1])


def test_train_recovery_process_count(tmp_path):
    """Without NPROC and without CUDA: tp x pp processes, from the arguments or the --config file."""
    cfg = tmp_path / "train.json"
    cfg.write_text(json.dumps({"tp": 2, "pp": 2}))
    assert _torchrun_nproc("--load", "x", "--tp", "2", "--data-path", "d") == 2
    assert _torchrun_nproc("--config", str(cfg)) == 4
    assert _torchrun_nproc("--config", str(cfg), "--tp", "1") == 2  # the command line wins over the file
    assert _torchrun_nproc("--tp", "2", NPROC="6") == 6


def test_default_nproc_is_the_gpu_count_with_cuda(monkeypatch):
    import torch

    from megatron_prune.cli.train import default_nproc

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert default_nproc(["--tp", "2"]) == 8


def _logging_python(tmp_path: Path) -> tuple[Path, Path]:
    """A PYTHON that records each of its command lines, then runs the venv's python: shows whether torchrun ran."""
    log, wrapper = tmp_path / "calls.log", tmp_path / "python"
    wrapper.write_text(f'#!/bin/bash\necho "$*" >> {log}\nexec {VENV_PYTHON} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper, log


def _budget_rows(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.split()[:1] and line.split()[0].isdigit()]


def test_prune_budget_dry_run_is_one_process(ckpt_tp2, tmp_path):
    """--target-params ... --dry-run (or TARGET_PARAMS=... DRY_RUN=1): the candidate table from one python process,
    no torchrun, no --save needed, nothing written; a flag wins over its variable (--no-dry-run over DRY_RUN=1)."""
    python, log = _logging_python(tmp_path)
    flags = run("scripts/prune_llama.sh", "--load", ckpt_tp2, "--target-params", "50%", "--width-multiple", "8",
                "--dry-run", PYTHON=python)
    env = run("scripts/prune_llama.sh", PYTHON=python, LOAD=ckpt_tp2, TARGET_PARAMS="50%", WIDTH_MULTIPLE="8",
              SEARCH_CANDIDATES="3", TARGET_MEMORY_GB="0.001", MEMORY_SEQ_LENGTH="16", MEGATRON_ONLY_SHAPES="1",
              DRY_RUN="1")
    calls = log.read_text().splitlines()
    assert len(calls) == 2 and not any("launch" in c or "--check-only" in c for c in calls), calls
    assert "% of budget" in flags.stdout and len(_budget_rows(flags.stdout)) >= 2
    assert "memory GiB" in env.stdout and "KV cache of 1 x 16 tokens" in env.stdout
    assert len(_budget_rows(env.stdout)) >= 3 and "a run evaluates 3 of them" in env.stdout
    assert calls[1].split()[calls[1].split().index("--search-candidates") + 1] == "3"
    assert "--megatron-only-shapes" in calls[1].split() and "--megatron-only-shapes" not in calls[0].split()
    assert not list(tmp_path.glob("out*"))
    # --no-dry-run on the command line wins over DRY_RUN=1: the pre-flight check runs (and refuses without --save)
    res = run("scripts/prune_llama.sh", "--no-dry-run", ok=False, PYTHON=python, LOAD=ckpt_tp2, TARGET_PARAMS="50%",
              WIDTH_MULTIPLE="8", DRY_RUN="1")
    assert res.returncode == 2 and res.stderr.startswith("error: the following arguments are required: --save "
                                                         "(or SAVE)"), res.stderr
    assert "--check-only" in log.read_text().splitlines()[-1]


def test_prune_budget_is_checked_before_torchrun(ckpt_tp2, tmp_path):
    """Without --dry-run the script's one-process check (--check-only) validates the budget: an unreachable one is
    one line naming the closest shape, and torchrun never starts."""
    python, log = _logging_python(tmp_path)
    bad = run("scripts/prune_llama.sh", "--load", ckpt_tp2, "--save", tmp_path / "out", ok=False, PYTHON=python,
              TARGET_PARAMS="1000")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "closest: " in bad.stderr, bad.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 1 and "--check-only" in calls[0] and not (tmp_path / "out").exists()
