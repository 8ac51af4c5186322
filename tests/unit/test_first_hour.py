"""What a newcomer meets in the first hour (issue 24), below the shell scripts: quiet third-party warnings, the
environment check's rules, messages that say what to do, CPU-sized training defaults, and small output defects
(norm epsilon, the export bar, plot legends)."""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from megatron_prune.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------- quiet
def _emit() -> None:
    warnings.warn("full scope is deprecated. Use empty cuda_graph_scope", UserWarning)  # in NOISE
    warnings.warn("an API is going away", DeprecationWarning)
    for _ in range(3):
        warnings.warn("something a user should know", UserWarning)


def test_third_party_noise_is_filtered_and_restored(monkeypatch):
    from megatron_prune.cli.quiet import third_party_noise

    monkeypatch.setattr(sys, "warnoptions", [])
    monkeypatch.delenv("RANK", raising=False)
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with third_party_noise():
            _emit()
        assert [str(w.message) for w in seen] == ["something a user should know"]  # once, from rank 0
        assert warnings.filters[1:] == before  # (catch_warnings above added its own "always" in front)
        seen.clear()
        with third_party_noise(verbose=True):
            _emit()
        assert len(seen) == 5  # -v: everything


def test_other_ranks_print_no_third_party_warnings(monkeypatch):
    from megatron_prune.cli.quiet import third_party_noise

    monkeypatch.setenv("RANK", "1")
    megatron = logging.getLogger("megatron.core.test")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with third_party_noise():
            _emit()
            assert not megatron.isEnabledFor(logging.WARNING)
        assert not seen and megatron.isEnabledFor(logging.WARNING)


def test_every_subcommand_has_verbose_and_no_abbreviations():
    from megatron_prune.cli.commands import SUBCOMMANDS, make_parser

    for name in SUBCOMMANDS:
        _, parser = make_parser(name)
        assert parser.allow_abbrev is False and "--verbose" in parser._option_string_actions, name
    _, parser = make_parser("train")
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--load", "x", "--train-iter", "2"])
    assert e.value.code == 2


# ---------------------------------------------------------------------------------------------- env check
def test_env_check_rules():
    from megatron_prune.cli.env_check import declared_elsewhere, distance, suspects

    declared = ["LOAD", "SAVE", "TP", "HIDDEN_SIZE_REMAIN", "NUM_ATTENTION_HEADS_REMAIN", "NUM_QUERY_GROUPS_REMAIN",
                "FFN_HIDDEN_SIZE_REMAIN", "NUM_LAYERS_REMAIN", "IMPORTANCE", "PYTHON", "OMP_NUM_THREADS"]
    assert distance("HIDEN_SIZE_REMAIN", "HIDDEN_SIZE_REMAIN", 2) == 1
    assert distance("SZIE", "SIZE", 1) == 1  # a swap of neighbours is one edit
    usual = ["PATH", "HOME", "LANG", "TERM", "SHELL", "PWD", "OLDPWD", "USER", "INPUTRC", "HF_HOME", "TMPDIR",
             "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "PYTHONPATH", "PYTHONHASHSEED", "LOCAL_RANK", "RANK", "TZ",
             "SLURM_NNODES", "NCCL_DEBUG", "TOKENIZERS_PARALLELISM", "LOGNAME", "MAIL", "EDITOR", "PAGER"]
    assert suspects(usual, declared, set()) == []
    assert suspects(["HIDEN_SIZE_REMAIN", "SAVE", "IMPORTANSE", "NUM_HEADS_REMAIN", "TP_SIZE"], declared, set()) == [
        ("HIDEN_SIZE_REMAIN", "HIDDEN_SIZE_REMAIN"), ("IMPORTANSE", "IMPORTANCE"),
        ("NUM_HEADS_REMAIN", "NUM_ATTENTION_HEADS_REMAIN")]
    # a near miss that another script of the repository declares is that script's setting, not a typo
    assert suspects(["LOADS"], declared, {"LOADS"}) == []
    elsewhere = declared_elsewhere()
    assert {"HF_DIR", "DTYPE", "NPROC", "TEXT_FILE", "HIDDEN_SIZE_REMAIN", "DRY_RUN", "NLTK_DATA"} <= elsewhere


# ---------------------------------------------------------------------------------------------- messages
def test_tp_error_lists_the_sizes_that_work():
    from megatron_prune.config.shape import LlamaShape, ShapeError

    smol = LlamaShape(num_layers=30, hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9, num_query_groups=3,
                      kv_channels=64, vocab_size=49152)
    assert smol.tp_sizes() == [1, 3]
    with pytest.raises(ShapeError, match=r"^TP 2 does not divide 9 heads / 3 query groups: use TP 1 or 3$"):
        smol.check_parallel(2)
    with pytest.raises(ShapeError, match=r"^PP 4 does not divide 30 layers: use PP 1, 2, 3, 5, 6, 10, 15 or 30$"):
        smol.check_parallel(1, 4)


def test_prelaunch_never_starts_torchrun_after_a_failed_check(monkeypatch, tmp_path, capsys):
    from megatron_prune.cli import launch, prelaunch

    started = []
    monkeypatch.setattr(launch, "main", lambda argv: started.append(argv) or 0)
    rc = prelaunch.main(["--standalone", "--nproc", "", "--nproc-name", "NPROC", "--", "train", "--load",
                         str(tmp_path / "missing"), "--data-path", "d", "--train-iters", "1", "--no-save"])
    assert rc == 2 and not started
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing'}: not a checkpoint (no such directory); " \
                                      f"`convert hf-to-megatron` makes one from an HF model\n"


# ---------------------------------------------------------------------------------------------- train defaults
def _train_parser():
    from megatron_prune.cli.commands import make_parser

    return make_parser("train")


def test_train_help_states_cpu_defaults_and_never_an_empty_default():
    out = subprocess.run([sys.executable, "-m", "megatron_prune", "train", "--help"], capture_output=True, text=True,
                         env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"}, cwd=ROOT).stdout
    assert out and "(default: )" not in out
    assert "tokens per sequence (default: 2048; 256 on a machine without CUDA)" in out
    assert "(default: bf16; fp32 on a machine without CUDA)" in out
    assert "(default: 10; 2 on a machine without CUDA)" in out
    assert "all data-parallel ranks (default: 8; 4 on a machine without CUDA)" in out
    assert "--no-save" in out and "(default: the --load checkpoint's)" in out


def test_train_defaults_follow_the_machine_and_the_checkpoint(monkeypatch, tmp_path):
    import torch

    from megatron_prune.checkpoint.convert_files import hf_to_megatron
    from tests.helpers import make_hf_model

    make_hf_model(tmp_path / "hf", num_hidden_layers=2)
    hf_to_megatron(tmp_path / "hf", tmp_path / "tp2", tp=2, pp=1, progress=False)
    module, parser = _train_parser()
    args = ["--load", str(tmp_path / "tp2"), "--data-path", "d", "--train-iters", "1", "--no-save"]
    cpu = module.build_config(parser.parse_args(args))
    assert (cpu.seq_length, cpu.global_batch_size, cpu.precision, cpu.eval_iters) == (256, 4, "fp32", 2)
    assert (cpu.tp, cpu.pp) == (2, 1)
    given = module.build_config(parser.parse_args([*args, "--seq-length", "64", "--bf16", "--tp", "1"]))
    assert (given.seq_length, given.precision, given.tp) == (64, "bf16", 1)  # the user's settings win
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = module.build_config(parser.parse_args(args))
    assert (gpu.seq_length, gpu.global_batch_size, gpu.precision, gpu.eval_iters) == (2048, 8, "bf16", 10)


def test_train_without_save_is_refused_unless_meant():
    module, parser = _train_parser()
    base = ["--load", "x", "--data-path", "d", "--train-iters", "1"]
    with pytest.raises(UserError, match=r"^--save is required: .* \(give --no-save to train and keep nothing\)$"):
        module.build_config(parser.parse_args(base))
    assert module.build_config(parser.parse_args([*base, "--no-save"])).save is None


def test_prune_defaults_to_activation_importance():
    from megatron_prune.cli.commands import make_parser

    module, parser = make_parser("prune")
    args = parser.parse_args(["--load", "x", "--save", "y", "--hidden-size-remain", "32"])
    assert module.build_config(args).importance == "activation"
    assert "(default: activation)" in parser.format_help().replace("\n", " ").replace("  ", " ")
    with pytest.raises(UserError, match="^nothing to prune: give target sizes"):
        module.build_config(parser.parse_args(["--load", "x", "--save", "y"]))


# ---------------------------------------------------------------------------------------------- outputs
def test_norm_epsilon_prints_as_the_config_says(tmp_path):
    """An HF config holding a float32 epsilon widened to float64 (9.999999747378752e-06, as GGUF-derived configs
    do) gives --norm-epsilon 1e-05: the shortest text that is the same float32."""
    from megatron_prune.checkpoint.convert_files import hf_to_megatron
    from megatron_prune.checkpoint.mlm_command import pretrain_gpt_flags
    from tests.helpers import make_hf_model, save_tiny_tokenizer

    make_hf_model(tmp_path / "hf", num_hidden_layers=2, rms_norm_eps=9.999999747378752e-06)
    save_tiny_tokenizer(tmp_path / "hf")
    hf_to_megatron(tmp_path / "hf", tmp_path / "mg", tp=1, pp=1, progress=False)
    flags = dict((f[0], f[1:]) for f in pretrain_gpt_flags(tmp_path / "mg")[0])
    assert flags["--norm-epsilon"] == ["1e-05"]


def test_export_progress_bar_reaches_its_total(tmp_path, capsys):
    from megatron_prune.checkpoint.convert_files import hf_to_megatron, megatron_to_hf
    from tests.helpers import make_hf_model

    make_hf_model(tmp_path / "hf", num_hidden_layers=2)
    hf_to_megatron(tmp_path / "hf", tmp_path / "mg", tp=2, pp=1, progress=False)
    capsys.readouterr()
    megatron_to_hf(tmp_path / "mg", tmp_path / "back", progress=True)
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    done, total = re.search(r" (\d+)/(\d+) ", last).groups()
    assert done == total == str(2 * 9 + 3), last  # 9 tensors per layer; embedding, final norm, output


def test_plot_legends_tell_runs_with_the_same_folder_name_apart(tmp_path):
    pytest.importorskip("matplotlib")
    from megatron_prune.cli import plot

    paths = []
    for run in ("a/recovered", "b/recovered", "c/kd"):
        (tmp_path / run).mkdir(parents=True)
        rec = {"kind": "train", "iteration": 1, "tokens": 256, "lm_loss": 5.0}
        (tmp_path / run / "metrics.jsonl").write_text(json.dumps(rec) + "\n")
        paths.append(tmp_path / run / "metrics.jsonl")
    assert plot.legend_labels(paths) == ["a/recovered", "b/recovered", "kd"]
    p = argparse.ArgumentParser()
    plot.add_arguments(p)
    assert plot.run(p.parse_args([*map(str, paths), "--out", str(tmp_path / "loss.png")])) == 0


def test_default_importance_without_a_tokenizer_says_what_to_do(tmp_path, capsys):
    """Hand sizes alone now calibrate (activation): on a checkpoint without tokenizer files the one line says how
    to go on."""
    from megatron_prune.__main__ import main
    from megatron_prune.checkpoint.convert_files import hf_to_megatron
    from tests.helpers import make_hf_model

    make_hf_model(tmp_path / "hf", num_hidden_layers=2)
    hf_to_megatron(tmp_path / "hf", tmp_path / "mg", tp=1, pp=1, progress=False)
    capsys.readouterr()  # (transformers' own save bar)
    argv = ["prune", "--load", str(tmp_path / "mg"), "--save", str(tmp_path / "out"), "--num-layers-remain", "1",
            "--check-only"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.rstrip().endswith(
        "activation importance (the default) calibrates on text: give --tokenizer, or --importance magnitude / random")
    assert main([*argv, "--importance", "random"]) == 0 and not (tmp_path / "out").exists()
