"""Faults and misuse (docs/reliability.md): overlapping paths, full or read-only disks, stale temporaries,
fsync before publishing, and the one user-error contract. Every case checks that the input is byte-identical
afterwards and that nothing is left at the output."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_prune.__main__ import main
from megatron_prune.checkpoint import atomic
from megatron_prune.checkpoint.convert_files import hf_to_megatron
from tests.helpers import VARIANTS, make_hf_model

REPO = Path(__file__).resolve().parents[2]


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under `root` (or `root` itself) -> sha256: 'byte-identical' means equal digests."""
    root = Path(root)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """An HF model, its TP=2 Megatron conversion, a saved plan, a jsonl file and a counts-like file."""
    root = tmp_path_factory.mktemp("rel")
    make_hf_model(root / "hf", **VARIANTS["gqa"])
    hf_to_megatron(root / "hf", root / "mg", tp=2, progress=False)
    _plan(root)
    (root / "text.jsonl").write_text(json.dumps({"text": "hello world"}) + "\n")
    return root


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("removed stale")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _cases(root: Path) -> dict[str, tuple[list[str], Path, str]]:
    """command -> (argv with SAVE placeholder, the input it reads, the input's flag)."""
    hf, mg = root / "hf", root / "mg"
    plan = root / "plan.json"
    return {
        "hf-to-megatron": (["convert", "hf-to-megatron", "--hf-dir", str(hf), "--tp", "1"], hf, "--hf-dir"),
        "megatron-to-hf": (["convert", "megatron-to-hf", "--load", str(mg)], mg, "--load"),
        "prune-hf": (["prune-hf", "--hf-dir", str(hf), "--plan", str(plan)], hf, "--hf-dir"),
        "prune": (["prune", "--load", str(mg), "--hidden-size-remain", "48"], mg, "--load"),
        "reshard": (["reshard", "--load", str(mg), "--tp", "1"], mg, "--load"),
        "prune-vocab": (["prune-vocab", "--counts", str(root / "counts.json"), "--keep", "100", "--tokenizer",
                         str(root / "tok.model"), "--load", str(mg)], mg, "--load"),
    }


def _plan(root: Path) -> None:
    """A real plan for prune-hf, made by the pruner's pure planner (random, seeded)."""
    from megatron_prune.checkpoint import megatron_io as mio
    from megatron_prune.prune.random_plan import random_plan
    from megatron_prune.prune.select import PruneTarget

    meta = mio.read_meta(root / "mg")
    random_plan(meta.shape, PruneTarget(hidden_size=48), seed=0, tp=meta.tp).save(root / "plan.json")


@pytest.mark.parametrize("relation", ["equal", "inside", "parent"])
@pytest.mark.parametrize("command", ["hf-to-megatron", "megatron-to-hf", "prune-hf", "prune", "reshard",
                                     "prune-vocab"])
def test_save_overlapping_an_input_is_refused(ckpts, command, relation, capsys):
    argv, source, flag = _cases(ckpts)[command]
    save = {"equal": source, "inside": source / "out", "parent": source.parent}[relation]
    before = tree_digest(source)
    capsys.readouterr()
    rc = main([*argv, "--save", str(save), "--overwrite", "--no-progress"]
              if command != "prune" else [*argv, "--save", str(save), "--overwrite"])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2
    word = {"equal": " is ", "inside": " is inside ", "parent": " contains "}[relation]
    assert word in line and flag in line, line
    assert tree_digest(source) == before
    assert not (source / "out").exists()


def test_symlinked_save_resolving_to_the_input_is_refused(ckpts, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(ckpts / "mg")
    before = tree_digest(ckpts / "mg")
    rc = main(["reshard", "--load", str(ckpts / "mg"), "--save", str(link / "release"), "--tp", "1", "--overwrite",
               "--no-progress"])
    assert rc == 2 and "is inside --load" in _one_error_line(capsys.readouterr().err)
    assert tree_digest(ckpts / "mg") == before


def test_vocab_freq_output_over_its_input_is_refused(ckpts, capsys):
    text = ckpts / "text.jsonl"
    before = tree_digest(text)
    rc = main(["vocab-freq", "--tokenizer", str(REPO / "tests/data/mistral_tokenizer.model.v1"), "--input",
               str(text), "--output", str(text), "--overwrite", "--no-progress"])
    assert rc == 2 and "--output" in _one_error_line(capsys.readouterr().err)
    assert tree_digest(text) == before


def test_train_save_inside_load_is_refused_but_equal_is_allowed(ckpts, capsys):
    from megatron_prune.train.config import TrainConfig

    common = dict(load=str(ckpts / "mg"), data_path=("data/x_text_document",), train_iters=1,
                  micro_batch_size=1, global_batch_size=1, seq_length=16)
    with pytest.raises(atomic.OverlapError, match="is inside --load"):
        TrainConfig(save=str(ckpts / "mg" / "sub"), **common)
    with pytest.raises(atomic.OverlapError, match="contains --load"):
        TrainConfig(save=str(ckpts), **common)
    with pytest.raises(atomic.OverlapError, match="is --teacher-load"):
        TrainConfig(save=str(ckpts / "teacher"), teacher_load=str(ckpts / "teacher"), **common)
    TrainConfig(save=str(ckpts / "mg"), **common)  # in-place training: Megatron-LM's resume idiom


# ------------------------------------------------------------------------------------- disks
def _mount_tmpfs(path: Path, size: str, readonly: bool = False) -> None:
    path.mkdir()
    opts = f"size={size}" + (",ro" if readonly else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()}); the simulated cases still run")


@pytest.fixture
def small_disk(tmp_path):
    mounted = []

    def make(size: str = "256k", readonly: bool = False) -> Path:
        path = tmp_path / f"disk{len(mounted)}"
        _mount_tmpfs(path, size, readonly)
        mounted.append(path)
        return path

    yield make
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_full_disk_is_refused_before_writing(ckpts, small_disk, capsys):
    disk = small_disk("256k")
    before = tree_digest(ckpts / "hf")
    rc = main(["convert", "hf-to-megatron", "--hf-dir", str(ckpts / "hf"), "--save", str(disk / "out"),
               "--no-progress"])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and line.startswith(f"error: no space left on device writing {disk / 'out'} (need ~")
    assert "iB free)" in line
    assert list(disk.iterdir()) == [] and tree_digest(ckpts / "hf") == before


def test_disk_filling_up_mid_write_leaves_nothing(ckpts, small_disk, monkeypatch, capsys):
    disk = small_disk("300k")
    import megatron_prune.checkpoint.convert_files as cf

    monkeypatch.setattr(cf, "check_free_space", lambda *a: None)  # as if the estimate had been too low
    rc = main(["convert", "hf-to-megatron", "--hf-dir", str(ckpts / "hf"), "--save", str(disk / "out"),
               "--no-progress"])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and line.startswith("error: no space left on device writing "), line
    assert list(disk.iterdir()) == []


def test_read_only_output_is_one_line(ckpts, small_disk, capsys):
    disk = small_disk("1m", readonly=True)
    rc = main(["convert", "megatron-to-hf", "--load", str(ckpts / "mg"), "--save", str(disk / "out"),
               "--no-progress"])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and line == f"error: cannot write {disk / 'out'}: read-only file system", line


def test_simulated_enospc_in_a_rank_file_removes_partial_files(ckpts, tmp_path, monkeypatch, capsys):
    """No mount needed: torch.save fails half-way with ENOSPC after writing bytes."""
    from megatron_prune.checkpoint import megatron_io as mio

    def failing_save(obj, path):
        Path(path).write_bytes(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mio, "torch_save", failing_save)
    rc = main(["reshard", "--load", str(ckpts / "mg"), "--save", str(tmp_path / "out"), "--tp", "1",
               "--no-progress"])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and "no space left on device writing" in line and "model_optim_rng.pt" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------- leftovers
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_dead_processes_are_removed(ckpts, tmp_path, capsys):
    dead, alive = _dead_pid(), os.getppid()
    stale_old = tmp_path / f".out.tmp-{dead}"                        # the naming of earlier versions
    stale_new = tmp_path / atomic.temp_name("out").replace(str(os.getpid()), str(dead))
    live = tmp_path / f".out.tmp-{alive}"
    other_host = tmp_path / f".out.tmp-some-other-node-{dead}"       # a shared file system: not ours to judge
    for d in (stale_old, stale_new, live, other_host):
        d.mkdir()
        (d / "model_optim_rng.pt").write_bytes(b"partial")
    rc = main(["convert", "hf-to-megatron", "--hf-dir", str(ckpts / "hf"), "--save", str(tmp_path / "out"),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0
    assert not stale_old.exists() and not stale_new.exists()
    assert live.exists() and other_host.exists()
    assert err.count("removed stale temporary") == 2 and f"dead process {dead}" in err


def test_preprocess_stale_temporary_is_removed(tmp_path, capsys):
    dead = _dead_pid()
    (tmp_path / "text.jsonl").write_text(json.dumps({"text": "hello world, again"}) + "\n")
    prefix = tmp_path / "out"
    stale = tmp_path / f"out_text_document.bin.tmp-{dead}"   # what a killed run of earlier versions left
    stale.write_bytes(b"partial")
    rc = main(["preprocess", "--input", str(tmp_path / "text.jsonl"), "--tokenizer",
               str(REPO / "tests/data/mistral_tokenizer.model.v1"), "--output-prefix", str(prefix),
               "--workers", "1", "--no-progress"])
    assert rc == 0 and not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out_text_document.bin", "out_text_document.idx",
                                                           "text.jsonl"]


# ------------------------------------------------------------------------------------- durability
def test_outputs_are_fsynced_before_they_are_published(ckpts, tmp_path, monkeypatch):
    synced, renamed = [], []
    real_fsync, real_rename = os.fsync, Path.rename

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def rename(self, target):
        renamed.append((str(self), list(synced)))
        return real_rename(self, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "rename", rename)
    hf_to_megatron(ckpts / "hf", tmp_path / "out", tp=2, progress=False)
    publish = [seen for src, seen in renamed if Path(src).name.startswith(".out.tmp-")]
    assert len(publish) == 1
    before = publish[0]
    for rel in ("release/mp_rank_00/model_optim_rng.pt", "release/mp_rank_01/model_optim_rng.pt",
                "latest_checkpointed_iteration.txt", "megatron_prune.json"):
        assert any(p.endswith(rel) for p in before), (rel, before)
    assert str(tmp_path) in synced  # the parent directory after the rename


# ------------------------------------------------------------------------------------- the error contract
def test_programming_error_shows_a_traceback(ckpts, tmp_path):
    code = ("import sys; import megatron_prune.checkpoint.convert_files as cf\n"
            "def boom(*a, **k): raise KeyError('internal')\n"
            "cf.mio.megatron_args = boom\n"
            "from megatron_prune.__main__ import main\n"
            f"sys.exit(main(['convert', 'hf-to-megatron', '--hf-dir', {str(ckpts / 'hf')!r}, "
            f"'--save', {str(tmp_path / 'out')!r}, '--no-progress']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1 and "Traceback" in r.stderr and "KeyError: 'internal'" in r.stderr
    assert not (tmp_path / "out").exists()


def test_every_domain_error_is_a_user_error():
    from megatron_prune.errors import UserError

    import megatron_prune.checkpoint.hf_io as hf_io
    import megatron_prune.config.shape as shape
    import megatron_prune.data.preprocess as pre
    import megatron_prune.data.tokenizers as toks
    import megatron_prune.prune.plan as plan
    import megatron_prune.train.config as tcfg
    import megatron_prune.vocab.counts as counts
    import megatron_prune.vocab.hf_tokenizer as hft
    import megatron_prune.vocab.spm as spm
    import megatron_prune.vocab.tokenizer_files as tf

    for cls in (hf_io.CheckpointError, shape.ShapeError, pre.PreprocessError, toks.TokenizerError, plan.PlanError,
                tcfg.ConfigError, counts.CountsError, hft.HFTokenizerError, spm.SpmError, tf.TokenizerFileError,
                atomic.OutputExistsError, atomic.OverlapError, atomic.WriteError):
        assert issubclass(cls, UserError), cls


def test_convert_help_lists_its_subcommands(capsys):
    assert main(["convert", "--help"]) == 0
    out = capsys.readouterr().out
    assert "convert hf-to-megatron" in out and "convert megatron-to-hf" in out
    assert main(["convert"]) == 2
    assert "needs one of its subcommands" in capsys.readouterr().err


def test_a_second_writer_of_the_same_output_is_refused(ckpts, tmp_path, capsys):
    """convert/reshard/prune-hf/prune-vocab hold the output's lock while they write (atomic_dir)."""
    from megatron_prune.checkpoint.lock import output_lock

    with output_lock(tmp_path / "out"):
        rc = main(["reshard", "--load", str(ckpts / "mg"), "--save", str(tmp_path / "out"), "--tp", "1",
                   "--no-progress"])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and "is locked by" in line and f"pid {os.getpid()}" in line, line
    assert not (tmp_path / "out").exists()


def test_a_single_file_write_is_fsynced_with_its_directory(tmp_path, monkeypatch):
    """Training checkpoints write rank files into an existing directory: each is fsynced before its rename."""
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                 real_fsync(fd))[1])
    atomic.atomic_file(tmp_path / "model_optim_rng.pt", lambda tmp: tmp.write_bytes(b"weights"))
    assert any(".model_optim_rng.pt.tmp-" in p for p in synced) and str(tmp_path) in synced
    assert (tmp_path / "model_optim_rng.pt").read_bytes() == b"weights"
    assert [p.name for p in tmp_path.iterdir()] == ["model_optim_rng.pt"]


# ------------------------------------------------------------------------------------- one contract, one place
def test_the_contract_is_applied_once_by_main():
    """__main__ wraps every subcommand in `user_errors`; a module that wraps its own `run` again is a second home
    of the contract (issue 19). model.agree takes the rule from errors.py, not from the CLI layer above it."""
    import importlib

    from megatron_prune import __main__ as entry
    from megatron_prune.model import agree

    twice = [name for name, (module, _) in entry.SUBCOMMANDS.items()
             if hasattr(importlib.import_module(module).run, "__wrapped__")]
    assert twice == []
    assert agree.user_error_message.__module__ == "megatron_prune.errors"


def test_preprocess_user_error_is_one_line_through_main(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    rc = main(["preprocess", "--input", str(tmp_path / "bad.jsonl"), "--tokenizer",
               str(REPO / "tests/data/mistral_tokenizer.model.v1"), "--output-prefix", str(tmp_path / "out"),
               "--workers", "1", "--no-progress"])
    assert rc == 2 and "invalid JSON" in _one_error_line(capsys.readouterr().err)


def test_programming_error_in_the_reshard_writer_keeps_its_traceback(ckpts, tmp_path):
    """The contract for the reshard writer: a bug inside its rank-file write is a traceback and exit 1 (never an
    `error:` line), and its temporary output is removed; a full disk there is one line, exit 2
    (test_simulated_enospc_in_a_rank_file_removes_partial_files)."""
    code = ("import sys; import megatron_prune.checkpoint.megatron_io as mio\n"
            "def boom(*a, **k): raise KeyError('internal')\n"
            "mio.torch_save = boom\n"
            "from megatron_prune.__main__ import main\n"
            f"sys.exit(main(['reshard', '--load', {str(ckpts / 'mg')!r}, '--save', {str(tmp_path / 'out')!r}, "
            "'--tp', '1', '--no-progress']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1 and "Traceback" in r.stderr and "KeyError: 'internal'" in r.stderr, r.stderr[-2000:]
    assert "error:" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_disk_filling_up_while_writing_safetensors_is_one_line(ckpts, small_disk, monkeypatch, capsys):
    """The HF writer (export, prune-hf, prune-vocab --hf-dir): safetensors reports a full disk as its own
    SafetensorError, which used to pass every OS-error translation (a 25-line traceback). Now one line naming the
    output, exit 2, and nothing left on the disk."""
    disk = small_disk("300k")
    import megatron_prune.checkpoint.convert_files as cf

    monkeypatch.setattr(cf, "check_free_space", lambda *a: None)  # as if the estimate had been too low
    rc = main(["convert", "megatron-to-hf", "--load", str(ckpts / "mg"), "--save", str(disk / "out"),
               "--no-progress"])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and line.startswith(f"error: no space left on device writing {disk / 'out'}"), line
    assert list(disk.iterdir()) == []


def test_simulated_full_disk_in_a_safetensors_shard_removes_partial_files(ckpts, tmp_path, monkeypatch, capsys):
    """No mount needed: the shard write fails half-way as safetensors fails on ENOSPC."""
    import safetensors.torch
    from safetensors import SafetensorError

    def failing_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"x" * 1000)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    rc = main(["convert", "megatron-to-hf", "--load", str(ckpts / "mg"), "--save", str(tmp_path / "out"),
               "--no-progress"])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and "no space left on device writing" in line and str(tmp_path / "out") in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_legal_250_character_output_name_works(ckpts, tmp_path, capsys):
    """NAME_MAX is 255 bytes: a 250-character output name is legal, but its siblings `.NAME.tmp-HOST-PID` and
    `.NAME.megatron_prune.lock` were not (`File name too long`). Long names get shortened siblings (a prefix and a
    hash of the whole name): the write works, its lock still refuses a second writer, a dead run's temporary is
    still recognised and removed, and nothing is left beside the output."""
    from megatron_prune.checkpoint.lock import output_lock

    out = tmp_path / ("o" * 250)
    with output_lock(out):
        assert main(["convert", "hf-to-megatron", "--hf-dir", str(ckpts / "hf"), "--save", str(out),
                     "--no-progress"]) == 2
    assert "is locked by" in _one_error_line(capsys.readouterr().err)
    stale = tmp_path / atomic.temp_name(out.name).replace(str(os.getpid()), str(_dead_pid()))
    assert len(stale.name.encode()) <= 255
    stale.mkdir()
    rc = main(["convert", "hf-to-megatron", "--hf-dir", str(ckpts / "hf"), "--save", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"removed stale temporary {stale}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    other = tmp_path / ("o" * 249 + "p")  # another long name sharing the first 190 bytes: its own siblings
    assert atomic.temp_name(other.name) != atomic.temp_name(out.name)


def test_ctrl_c_is_one_line_exit_130(tmp_path, monkeypatch, capsys):
    """Ctrl-C is handled once, by the shared contract (it was preprocess's own try/except): `error: interrupted`,
    exit 130, and the writer's partial output is gone."""
    import megatron_prune.data.preprocess as pre

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pre, "write_dataset", interrupted)
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    rc = main(["preprocess", "--input", str(tmp_path / "a.jsonl"), "--tokenizer",
               str(REPO / "tests/data/mistral_tokenizer.model.v1"), "--output-prefix", str(tmp_path / "out" / "ds"),
               "--workers", "1", "--no-progress"])
    assert rc == 130 and capsys.readouterr().err.strip() == "error: interrupted"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]
