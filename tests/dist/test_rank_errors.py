"""Whichever rank fails, the user sees one report, once (issue 12, item 3).

Entry-level cases use tests/dist/entry_cases.py under megatron_prune.cli.launch (no model: fast); the real cases
run scripts/prune_llama.sh and scripts/train_recovery.sh on a tiny checkpoint whose mp_rank_01 is truncated.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_prune.checkpoint import megatron_io as mio
from tests.dist.test_train_dist import GBS, SEQ, ws  # noqa: F401  (module fixture: tiny converted checkpoints)

pytestmark = pytest.mark.dist
REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHON": sys.executable,
       "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def launch(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_prune.cli.launch", "--standalone", *args],
                          capture_output=True, text=True, timeout=600, env={**ENV, **(env or {})}, cwd=REPO)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_one_report(out: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    errors = error_lines(out.stderr)
    assert out.returncode == code, out.stderr[-3000:]
    assert len(errors) == 1 and all(n in errors[0] for n in needles), out.stderr[-3000:]
    assert "Connection closed by peer" not in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "ChildFailedError" not in out.stderr, out.stderr[-3000:]


@pytest.mark.parametrize("where", ["agreed", "local"])
def test_user_error_on_rank_1_is_one_line(where):
    out = launch("--nproc-per-node", "2", "-m", "tests.dist.entry_cases", f"{where}-user")
    assert_one_report(out, 2, "mp_rank_01", "truncated")


@pytest.mark.parametrize("where", ["agreed", "local"])
def test_programming_error_on_rank_1_keeps_its_traceback_once(where):
    out = launch("--nproc-per-node", "2", "-m", "tests.dist.entry_cases", f"{where}-bug")
    assert out.returncode == 1, out.stderr[-3000:]
    assert out.stderr.count("Traceback (most recent call last)") == 1, out.stderr[-3000:]
    assert "TypeError: object of type 'NoneType' has no len()" in out.stderr and "rank 1:" in out.stderr
    assert "Connection closed by peer" not in out.stderr and "ChildFailedError" not in out.stderr


def truncated_rank_1(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    f = dst / "release" / "mp_rank_01" / mio.RANK_FILE
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    return dst


def test_prune_script_names_the_truncated_rank_1_file(ws, tmp_path):  # noqa: F811
    bad = truncated_rank_1(ws["root"] / "tp2", tmp_path / "bad")
    out = subprocess.run(["bash", str(REPO / "scripts" / "prune_llama.sh"), "--no-progress"], capture_output=True,
                         text=True, timeout=600, cwd=REPO,
                         env={**ENV, "LOAD": str(bad), "SAVE": str(tmp_path / "out"), "HIDDEN_SIZE_REMAIN": "48"})
    assert_one_report(out, 2, str(bad / "release" / "mp_rank_01" / mio.RANK_FILE), "cannot load")
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def train_args(load: Path, save: Path, data: str, *extra: str) -> list[str]:
    return ["--load", str(load), "--save", str(save), "--data-path", data, "--split", "98,2,0",
            "--micro-batch-size", "2", "--global-batch-size", str(GBS), "--seq-length", str(SEQ),
            "--lr", "3e-3", "--fp32", "--eval-iters", "0", "--log-interval", "1", *extra]


def train_script(nproc: int | None, args: list[str]) -> subprocess.CompletedProcess:
    """nproc None: the script's own default (tp x pp on CPU)."""
    env = {k: v for k, v in ENV.items() if k != "NPROC"}
    if nproc is not None:
        env["NPROC"] = str(nproc)
    return subprocess.run(["bash", str(REPO / "scripts" / "train_recovery.sh"), *args], capture_output=True,
                          text=True, timeout=600, cwd=REPO, env=env)


def test_train_script_names_the_truncated_rank_1_file(ws, tmp_path):  # noqa: F811
    bad = truncated_rank_1(ws["root"] / "tp2", tmp_path / "bad")
    # No NPROC: `--tp 2` alone must start 2 processes (rank 1 is the one that reads the bad file).
    out = train_script(None, train_args(bad, tmp_path / "run", ws["data"], "--tp", "2", "--train-iters", "1"))
    assert_one_report(out, 2, str(bad / "release" / "mp_rank_01" / mio.RANK_FILE), "cannot load")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_distributed_optimizer_resume_at_another_dp_size_is_one_line(ws, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    args = train_args(ws["root"] / "tp1", run, ws["data"], "--use-distributed-optimizer")
    first = subprocess.run([sys.executable, "-m", "megatron_prune", "train", *args, "--train-iters", "1"],
                           capture_output=True, text=True, timeout=600, env=ENV, cwd=REPO)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (run / "iter_0000001" / "mp_rank_00" / "distrib_optim_dp000.pt").is_file()
    out = train_script(2, args + ["--train-iters", "2"])  # DP=2 now: rank 1 has no shard, the sizes differ
    assert_one_report(out, 2, "saved by 1 data-parallel ranks, this job has 2")
    assert (run / mio.TRACKER).read_text().strip() == "1"


# ---------------------------------------------------------------------------------- issue 26 / issue 19
def test_one_process_under_the_script_is_one_line(ws, tmp_path):  # noqa: F811
    """NPROC=1 goes through cli/launch.py like NPROC=2: a user error is one line, exit 2 (was: exit 1, 18 lines,
    `worker rank 0 ... exited with code 2 without a report` and torchrun's summary box)."""
    out = train_script(1, train_args(ws["root"] / "tp1", tmp_path / "run", str(tmp_path / "nowhere"),
                                     "--train-iters", "1"))
    assert_one_report(out, 2, "indexed dataset(s) not found", str(tmp_path / "nowhere"))
    assert "without a report" not in out.stderr and "FAILED" not in out.stderr, out.stderr[-3000:]
    assert len(out.stderr.strip().splitlines()) <= 2, out.stderr[-3000:]  # the line, plus torchrun's own log line


def test_usage_error_under_the_script_is_one_line(ws, tmp_path):  # noqa: F811
    """Every rank parses the command line: rank 0 alone says what is wrong, exit 2 (was one line per rank, then
    `exited with code 2 without a report` and the summary box)."""
    out = train_script(2, train_args(ws["root"] / "tp1", tmp_path / "run", ws["data"], "--train-iters", "1",
                                     "--no-such-flag"))
    assert_one_report(out, 2, "--no-such-flag")
    assert "without a report" not in out.stderr and "FAILED" not in out.stderr, out.stderr[-3000:]


@pytest.mark.slow
def test_training_aborted_on_non_finite_steps_is_one_line_exit_2(ws, tmp_path):  # noqa: F811
    """TrainingAborted is a user error like any other: one line from rank 0, exit 2 through dist_entry (was: exit 1,
    33 lines and a false `rank 1 exited without a report`)."""
    args = train_args(ws["root"] / "tp1", tmp_path / "run", ws["data"], "--train-iters", "6", "--max-bad-steps", "2")
    args[args.index("--lr") + 1] = "1e12"
    out = train_script(2, args)
    assert_one_report(out, 2, "consecutive non-finite steps", "aborting")
    assert "without a report" not in out.stderr and "FAILED" not in out.stderr, out.stderr[-3000:]


@pytest.mark.parametrize("fault", ["bug", pytest.param("enospc", marks=pytest.mark.slow)])
def test_fault_in_the_train_writer_on_rank_1(ws, tmp_path, fault):  # noqa: F811
    """The contract for the train writer, from a rank that is not rank 0: a programming error inside the
    rank-file write keeps its traceback (once) and exits 1; a full disk there is one line naming the file, exit 2;
    neither leaves a tracker or a partial rank file behind."""
    args = ["train", *train_args(ws["root"] / "tp2", tmp_path / "run", ws["data"], "--tp", "2", "--train-iters", "1")]
    out = launch("--nproc-per-node", "2", "-m", "tests.dist.writer_faults", fault, "1", *args)
    if fault == "bug":
        assert out.returncode == 1, out.stderr[-3000:]
        assert out.stderr.count("Traceback (most recent call last)") == 1 and "KeyError: 'internal'" in out.stderr
        assert "rank 1:" in out.stderr and not error_lines(out.stderr), out.stderr[-3000:]
    else:
        assert_one_report(out, 2, "no space left on device writing", "mp_rank_01", mio.RANK_FILE)
    assert not (tmp_path / "run" / mio.TRACKER).exists()
    assert not [p for p in (tmp_path / "run").rglob("*") if ".tmp-" in p.name]


def test_train_on_a_torch_dist_checkpoint_with_a_truncated_chunk_is_one_report(ws, tmp_path):  # noqa: F811
    """torch_dist: every rank checks the chunk files named by .metadata before any read; one line, exit 2."""
    from megatron_prune.checkpoint.reshard_files import reshard

    reshard(ws["root"] / "tp2", tmp_path / "dist", tp=2, progress=False, ckpt_format="torch_dist")
    chunk = sorted((tmp_path / "dist" / "release").glob("*.distcp"))[-1]
    os.truncate(chunk, chunk.stat().st_size - 1)
    out = subprocess.run(["bash", str(REPO / "scripts" / "train_recovery.sh"),
                          *train_args(tmp_path / "dist", tmp_path / "out", ws["data"], "--train-iters", "1",
                                      "--tp", "2")],
                         capture_output=True, text=True, timeout=600, cwd=REPO, env=ENV)
    assert_one_report(out, 2, chunk.name, "truncated")
