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


def refused(res: subprocess.CompletedProcess, start: str) -> None:
    """A user error: exit 2 and one line on stderr, starting `start`."""
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and res.stderr.startswith(start), res.stderr


def meta(ckpt: Path) -> dict:
    return json.loads((ckpt / "megatron_prune.json").read_text())


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    from tests.helpers import make_hf_model

    from tests.helpers import save_tiny_tokenizer

    path = tmp_path_factory.mktemp("shell") / "hf"
    make_hf_model(path, num_hidden_layers=2)
    save_tiny_tokenizer(path)  # travels with every checkpoint made from it: calibration, training and eval read it
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


@pytest.mark.slow  # full runs through the script; the README walk (slow) runs it too
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


@pytest.mark.slow  # full runs through the script; the README walk (slow) runs it too
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
    res = run("scripts/prune_llama.sh", "--load", ckpt_tp2, "--save", tmp_path / "out", "--tp", "4",
              "--num-layers-remain", "1", ok=False)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith(f"error: --tp (or TP) 4, but {ckpt_tp2} is a tp=2 checkpoint")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def data(hf) -> str:
    """The shipped training text, tokenized with the checkpoints' tokenizer."""
    from megatron_prune.data.preprocess import PreprocessConfig, preprocess

    stats = preprocess(PreprocessConfig(inputs=[str(ROOT / "megatron_prune/data/samples/train.jsonl")],
                                        tokenizer=str(hf), output_prefix=str(hf.parent / "data" / "train"),
                                        append_eod=True, progress=False))
    return stats.prefix


def _torchrun_nproc(*args: str, **settings: str) -> int:
    words = run("scripts/train_recovery.sh", *args, DRY_RUN="1", **settings).stdout.split()
    assert "megatron_prune.cli.launch" in words and words[-len(args):] == list(args)  # torchrun, short failures
    return int(words[words.index("--nproc-per-node") + 1])


@pytest.mark.slow  # four full prelaunch checks
def test_train_recovery_process_count(ckpt_tp2, data, tmp_path):
    """Without NPROC and without CUDA: tp x pp processes (from the checkpoint, the arguments or the --config file);
    DRY_RUN=1 checks everything and prints the torchrun command."""
    cfg = tmp_path / "train.json"
    cfg.write_text(json.dumps({"tp": 2, "pp": 1}))
    base = ("--load", str(ckpt_tp2), "--data-path", data, "--train-iters", "1", "--no-save")
    assert _torchrun_nproc(*base) == 2  # the checkpoint's TP
    assert _torchrun_nproc(*base, "--config", str(cfg)) == 2
    assert _torchrun_nproc(*base, "--tp", "2") == 2
    assert _torchrun_nproc(*base, "--tp", "2", "--global-batch-size", "6", NPROC="6") == 6


def test_train_without_save_is_refused_before_torchrun(ckpt_tp2, data, tmp_path):
    """A run that would keep nothing is refused unless --no-save says it is meant."""
    refused(run("scripts/train_recovery.sh", "--load", ckpt_tp2, "--data-path", data, "--train-iters", "2",
                ok=False), "error: --save is required: training checkpoints and metrics.jsonl go there (give "
                           "--no-save")
    refused(run("scripts/train_recovery.sh", "--load", ckpt_tp2, "--data-path", data, "--train-iters", "2",
                "--save", tmp_path / "out", "--no-save", ok=False), "error: --no-save, but --save")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,settings,start", [
    ([], {}, "error: give --train-iters N (iterations) or --train-tokens N (tokens)"),
    (["--train-iter", "2"], {}, "error: unrecognized arguments: --train-iter 2"),  # no abbreviations
    (["--train-iters", "2", "--tp", "4"], {}, "error: TP 4 does not divide 4 heads / 2 query groups: use TP 1 or 2"),
    (["--train-iters", "2"], {"NPROC": "3"}, "error: NPROC 3 processes is not a multiple of --tp x --pp = 2 x 1: "
                                             "set NPROC to a multiple of 2"),
    (["--train-iters", "2", "--global-batch-size", "3"], {"NPROC": "4"},
     "error: --global-batch-size 3 is not divisible by --micro-batch-size 1 x data-parallel 2"),
    (["--train-iters", "2", "--data-path", "/nonexistent/x"], {}, "error: indexed dataset(s) not found"),
])
def test_train_argument_errors_before_torchrun(ckpt_tp2, data, tmp_path, args, settings, start):
    """Every argument problem is one line in flag (or variable) names from the launching process: the check
    (cli/prelaunch.py) runs before torchrun, so no worker starts and nothing is written."""
    res = run("scripts/train_recovery.sh", "--load", ckpt_tp2, "--data-path", data, "--save", tmp_path / "out",
              *args, ok=False, **settings)
    refused(res, start)
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint_is_named(tmp_path, data):
    for script, args in (("scripts/train_recovery.sh", ["--data-path", data, "--train-iters", "2", "--no-save"]),
                         ("scripts/prune_llama.sh", ["--save", tmp_path / "out", "--num-layers-remain", "1"]),
                         ("scripts/eval.sh", ["--text-file", ROOT / "megatron_prune/data/samples/heldout.jsonl"])):
        refused(run(script, "--load", tmp_path / "missing", *args, ok=False),
                f"error: {tmp_path / 'missing'}: not a checkpoint (no such directory)")
    (tmp_path / "empty").mkdir()
    refused(run("scripts/eval.sh", "--load", tmp_path / "empty", "--text-file", "x", ok=False),
            f"error: {tmp_path / 'empty'}: not a checkpoint (no tracker file latest_checkpointed_iteration.txt)")


@pytest.mark.slow  # full runs through the script; the README walk (slow) runs it too
def test_train_two_iterations(ckpt_tp2, data, tmp_path):
    """On CPU the defaults are CPU-sized (sequence 256, fp32, 2 evaluation batches): two iterations of a small
    model through the script train, evaluate, save, and say so on stderr without third-party warnings."""
    res = run("scripts/train_recovery.sh", "--load", ckpt_tp2, "--data-path", data, "--train-iters", "2",
              "--save", tmp_path / "out")
    assert (tmp_path / "out" / "iter_0000002").is_dir() and "x 256 tokens per rank" in res.stdout, res.stdout
    assert_quiet(res.stderr)
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if r["kind"] == "train"] == [1, 2]  # CPU: a line per iteration


def assert_quiet(stderr: str) -> None:
    """No third-party warning (megatron-core, torch, transformers) reached the user."""
    noise = [ln for ln in stderr.splitlines() if "Warning" in ln or "warnings.warn" in ln or "site-packages" in ln]
    assert not noise, stderr


@pytest.mark.slow  # full runs through the script; the README walk (slow) runs it too
def test_eval_script(ckpt_tp2, tmp_path):
    """scripts/eval.sh: the checkpoint's tp x pp processes through the quiet launcher; a missing input is one line
    naming the flag and its variable."""
    text = ROOT / "megatron_prune/data/samples/heldout.jsonl"
    res = run("scripts/eval.sh", "--text-file", text, "--max-tokens", "1024", "--json", LOAD=ckpt_tp2)
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert (result["tokens"], result["windows"]) == (1024, 2) and result["perplexity"] > 1, res.stdout
    assert_quiet(res.stderr)
    refused(run("scripts/eval.sh", "--load", ckpt_tp2, ok=False),
            "error: the following arguments are required: --text-file (or TEXT_FILE)")
    refused(run("scripts/eval.sh", "--load", ckpt_tp2, "--text-file", text, ok=False, NPROC="3"),
            f"error: NPROC 3 processes is not a multiple of {ckpt_tp2}'s tp x pp = 2 x 1: set NPROC to a multiple")


def test_default_nproc_is_the_gpu_count_with_cuda(monkeypatch):
    import torch

    from megatron_prune.cli.prelaunch import Launch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert Launch().processes(2, "--tp x --pp = 2 x 1") == 8
    with pytest.raises(Exception, match="this node's 8 GPUs are not a multiple of --tp x --pp = 3 x 1: set NPROC"):
        Launch(name="NPROC").processes(3, "--tp x --pp = 3 x 1")


def _process_log(tmp_path: Path) -> tuple[dict, Path]:
    """(settings, log): with these settings every Python process of a script appends a line to `log`, `worker
    ARGV` for a torchrun worker (LOCAL_RANK set), else `main ARGV`: shows whether torchrun started workers."""
    site, log = tmp_path / "site", tmp_path / "calls.log"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, sys\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    f.write(('worker ' if 'LOCAL_RANK' in os.environ else 'main ') + ' '.join(sys.orig_argv) + '\\n')\n")
    return {"PYTHONPATH": str(site)}, log


def _calls(log: Path, kind: str) -> list[str]:
    """The logged command lines of one kind (the environment check of every script left out)."""
    lines = log.read_text().splitlines() if log.exists() else []
    return [ln for ln in lines if ln.startswith(kind + " ") and "env_check" not in ln]


def _budget_rows(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.split()[:1] and line.split()[0].isdigit()]


def test_prune_budget_dry_run_is_one_process(ckpt_tp2, tmp_path):
    """--target-params ... --dry-run (or TARGET_PARAMS=... DRY_RUN=1): the candidate table from one python process,
    no torchrun, no --save needed, nothing written; a flag wins over its variable (--no-dry-run over DRY_RUN=1)."""
    logging, log = _process_log(tmp_path)
    flags = run("scripts/prune_llama.sh", "--load", ckpt_tp2, "--target-params", "50%", "--width-multiple", "8",
                "--dry-run", **logging)
    env = run("scripts/prune_llama.sh", LOAD=ckpt_tp2, TARGET_PARAMS="50%", WIDTH_MULTIPLE="8",
              SEARCH_CANDIDATES="3", TARGET_MEMORY_GB="0.001", MEMORY_SEQ_LENGTH="16", MEGATRON_ONLY_SHAPES="1",
              DRY_RUN="1", **logging)
    calls = _calls(log, "main")
    assert len(calls) == 2 and not _calls(log, "worker"), log.read_text()
    assert "% of budget" in flags.stdout and len(_budget_rows(flags.stdout)) >= 2
    assert "memory GiB" in env.stdout and "KV cache of 1 x 16 tokens" in env.stdout
    assert len(_budget_rows(env.stdout)) >= 3 and "a run evaluates 3 of them" in env.stdout
    assert calls[1].split()[calls[1].split().index("--search-candidates") + 1] == "3"
    assert "--megatron-only-shapes" in calls[1].split() and "--megatron-only-shapes" not in calls[0].split()
    assert not list(tmp_path.glob("out*"))
    # --no-dry-run on the command line wins over DRY_RUN=1: the pre-flight check runs (and refuses without --save)
    res = run("scripts/prune_llama.sh", "--no-dry-run", ok=False, LOAD=ckpt_tp2, TARGET_PARAMS="50%",
              WIDTH_MULTIPLE="8", DRY_RUN="1", **logging)
    refused(res, "error: the following arguments are required: --save (or SAVE)")
    assert not _calls(log, "worker")


def test_prune_budget_is_checked_before_torchrun(ckpt_tp2, tmp_path):
    """Without --dry-run the one-process check (cli/prelaunch.py) validates the budget: an unreachable one is one
    line naming the closest shape, and torchrun never starts a worker."""
    logging, log = _process_log(tmp_path)
    bad = run("scripts/prune_llama.sh", "--load", ckpt_tp2, "--save", tmp_path / "out", ok=False,
              TARGET_PARAMS="1000", **logging)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "closest: " in bad.stderr, bad.stderr
    assert len(_calls(log, "main")) == 1 and not _calls(log, "worker") and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- nothing done
def test_prune_without_sizes_is_refused(ckpt_tp2, tmp_path):
    """No sizes, or sizes that equal the checkpoint's, would write a copy: one line, nothing written, no worker."""
    logging, log = _process_log(tmp_path)
    refused(run("scripts/prune_llama.sh", "--load", ckpt_tp2, "--save", tmp_path / "out", ok=False, **logging),
            "error: nothing to prune: give target sizes")
    refused(run("scripts/prune_llama.sh", "--ffn-hidden-size-remain", "96", ok=False, LOAD=ckpt_tp2,
                SAVE=tmp_path / "out", **logging),
            f"error: nothing to prune: the target sizes equal {ckpt_tp2}'s shape (layers=2 hidden=64")
    assert not (tmp_path / "out").exists() and not _calls(log, "worker")


@pytest.mark.parametrize("variable,closest", [("HIDEN_SIZE_REMAIN", "HIDDEN_SIZE_REMAIN"),
                                              ("FFN_HIDDEN_SIZE_REMIAN", "FFN_HIDDEN_SIZE_REMAIN"),
                                              ("NUM_HEADS_REMAIN", "NUM_ATTENTION_HEADS_REMAIN"),
                                              ("IMPORTANCES", "IMPORTANCE")])
def test_misspelt_variable_is_refused(ckpt_tp2, tmp_path, variable, closest):
    """A variable meant for the script but spelt wrong would be ignored and prune nothing: refused, naming the
    closest setting."""
    res = run("scripts/prune_llama.sh", ok=False, LOAD=ckpt_tp2, SAVE=tmp_path / "out", **{variable: "32"})
    refused(res, f"error: {variable} is not a setting of scripts/prune_llama.sh (did you mean {closest}?)")
    assert not (tmp_path / "out").exists()


def test_unrelated_environment_is_left_alone(ckpt_tp2, tmp_path):
    """A login shell's usual variables, and variables other scripts of this repository read (exported once for
    several scripts), are no error."""
    usual = dict(LANG="C.UTF-8", TERM="xterm", SHELL="/bin/bash", PWD="/", OLDPWD="/", USER="u", LOGNAME="u",
                 HOSTNAME="h", INPUTRC="/etc/inputrc", HF_HOME="/tmp/hf", MKL_NUM_THREADS="1", TMPDIR="/tmp",
                 CUDA_VISIBLE_DEVICES="0", TOKENIZERS_PARALLELISM="false", PYTHONHASHSEED="0", EDITOR="vi",
                 SLURM_NNODES="1", NCCL_DEBUG="WARN", LD_LIBRARY_PATH="/x", VIRTUAL_ENV="/x", DISPLAY=":0",
                 HF_DIR="/x", DTYPE="bf16", NPROC="2", OUTPUT_PREFIX="/x", TEXT_FILE="/x")
    res = run("scripts/prune_llama.sh", "--load", ckpt_tp2, "--num-layers-remain", "1", "--check-only",
              SAVE=tmp_path / "out", **usual)
    assert res.stdout.count("ok: ") == 1, res.stdout  # --check-only: one process, one line
    assert not (tmp_path / "out").exists()


def test_abbreviated_flag_is_refused(ckpt_tp2, tmp_path):
    refused(run("scripts/prune_llama.sh", "--load", ckpt_tp2, "--save", tmp_path / "out", "--ffn-hidden-size-rem",
                "48", ok=False), "error: unrecognized arguments: --ffn-hidden-size-rem 48")
    assert not (tmp_path / "out").exists()


def test_reshard_script_and_its_former_name(ckpt_tp2, tmp_path):
    """scripts/reshard.sh runs `reshard`; scripts/transfer.sh stays as its alias for users' scripts."""
    run("scripts/reshard.sh", "--load", ckpt_tp2, "--save", tmp_path / "tp1", "--tp", "1", "--no-progress")
    run("scripts/transfer.sh", "--no-progress", LOAD=ckpt_tp2, SAVE=tmp_path / "pp2", PP="2")
    assert (meta(tmp_path / "tp1")["tp"], meta(tmp_path / "pp2")["pp"]) == (1, 2)
    assert "Change the tensor-parallel" in run("scripts/transfer.sh", "--help").stdout


def _system_python_without_torch() -> str:
    for python in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if Path(python).exists() and subprocess.run([python, "-c", "import torch"], capture_output=True).returncode:
            return python
    pytest.skip("no system python3 without torch here")


def test_outside_the_venv_every_entry_says_how_to_run_it(tmp_path):
    """A Python without torch: `python -m megatron_prune CMD` and the scripts print one line saying how to run
    them, not a traceback; --help still works."""
    python = _system_python_without_torch()
    res = subprocess.run([python, "-m", "megatron_prune", "train", "--load", "x"], capture_output=True, text=True,
                         cwd=ROOT, env=bare_env())
    refused(res, f"error: {python} cannot import 'torch', which megatron_prune needs: run `{VENV_PYTHON} -m "
                 f"megatron_prune train ...`")
    assert subprocess.run([python, "-m", "megatron_prune", "train", "--help"], capture_output=True, cwd=ROOT,
                          env=bare_env()).returncode == 0
    for script in ("scripts/prune_llama.sh", "scripts/train_recovery.sh", "scripts/eval.sh", "scripts/reshard.sh",
                   "tools/hf_to_megatron.sh", "tools/megatron_to_hf.sh", "tools/preprocess_data.sh",
                   "scripts/demo.sh"):
        refused(run(script, "--load", "x", ok=False, PYTHON=python),
                f"error: PYTHON={python} cannot import torch")


@pytest.mark.slow  # full runs through the script; the README walk (slow) runs it too
def test_ckpt_format_variable(ckpt_tp2, hf, data, tmp_path):
    """CKPT_FORMAT= like every other variable: transfer.sh writes torch_dist from it, a flag wins over it, and
    train_recovery.sh passes it to `train`."""
    from megatron_prune.checkpoint import megatron_io as mio

    run("scripts/transfer.sh", "--load", ckpt_tp2, "--save", tmp_path / "dist", "--no-progress",
        CKPT_FORMAT="torch_dist")
    assert mio.checkpoint_format(tmp_path / "dist") == "torch_dist"
    run("tools/hf_to_megatron.sh", "--hf-dir", hf, "--save", tmp_path / "legacy", "--ckpt-format", "torch",
        "--no-progress", CKPT_FORMAT="torch_dist")
    assert mio.checkpoint_format(tmp_path / "legacy") == "torch"
    dry = run("scripts/train_recovery.sh", "--load", tmp_path / "dist", "--tp", "1", "--data-path", data,
              "--train-iters", "1", "--no-save", DRY_RUN=1, NPROC=1, CKPT_FORMAT="torch_dist")
    assert "train --ckpt-format torch_dist --load" in dry.stdout
