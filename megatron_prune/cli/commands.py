"""The subcommands of `python -m megatron_prune` and the one parser factory every entry uses (__main__.py, and
cli/prelaunch.py before torchrun): each subcommand is a module with `add_arguments(parser)` and `run(args) -> int`,
imported only when asked for (megatron-core takes seconds to import)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

from megatron_prune.cli.common import ERROR_DIR_ENV, name_env_flags, peer_rank, user_errors
from megatron_prune.errors import EXIT_USER_ERROR

# name -> (module, one-line help). Two-word commands ("convert hf-to-megatron") are written with a space.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "convert hf-to-megatron": ("megatron_prune.cli.convert_hf", "HF LLaMA directory -> TP/PP Megatron shards"),
    "convert megatron-to-hf": ("megatron_prune.cli.convert_mg", "Megatron shards -> HF LLaMA directory"),
    "eval": ("megatron_prune.cli.eval", "mean next-token loss and perplexity of a Megatron checkpoint (torchrun)"),
    "reshard": ("megatron_prune.cli.reshard", "change the TP/PP size of a Megatron checkpoint"),
    "prune": ("megatron_prune.cli.prune", "prune a TP-sharded Megatron checkpoint (torchrun, one process per rank)"),
    "prune-hf": ("megatron_prune.cli.prune_hf", "apply a saved prune plan to an HF checkpoint"),
    "preprocess": ("megatron_prune.cli.preprocess", "jsonl / jsonl.zst / txt -> megatron indexed dataset (.bin/.idx)"),
    "train": ("megatron_prune.cli.train", "recovery training on megatron-core (torchrun)"),
    "plot": ("megatron_prune.cli.plot", "draw loss-vs-tokens curves from metrics.jsonl files"),
    "vocab-freq": ("megatron_prune.cli.vocab_freq", "count token frequencies of a corpus"),
    "prune-vocab": ("megatron_prune.cli.prune_vocab", "prune to an N-token vocabulary: tokenizer + embeddings"),
    "compress": ("megatron_prune.compress.cli",
                 "HF model -> pruned to a budget, recovered by distillation, exported and evaluated; resumable"),
    "megatron-lm-args": ("megatron_prune.cli.megatron_lm_args",
                         "print the Megatron-LM pretrain_gpt.py flags that load a checkpoint as the model it is"),
}


class _Parser(argparse.ArgumentParser):
    """A usage error is one line `error: ...` with exit code 2, like every other user error. The shell entry points
    (scripts/lib/env.sh) export which variable sets which flag, MEGATRON_PRUNE_ENV_FLAGS="--save=SAVE ...", so a
    missing or bad flag is named with its variable: `--save (or SAVE)`. No abbreviations: `--train-iter` is an
    unknown flag, not a silent `--train-iters`."""

    def __init__(self, *a, **k):
        k.setdefault("allow_abbrev", False)
        super().__init__(*a, **k)

    def error(self, message: str):
        text = f"{name_env_flags(message)} (see --help)"
        if peer_rank() or os.environ.get(ERROR_DIR_ENV):  # a torchrun worker, under cli/launch.py or not
            from megatron_prune.cli.dist_entry import note_error, wait_for_report

            if peer_rank():  # every rank parses the same arguments: rank 0 says it, once
                wait_for_report()
                self.exit(EXIT_USER_ERROR)
            if os.environ.get(ERROR_DIR_ENV):
                note_error(EXIT_USER_ERROR, text)  # for cli/launch.py's exit code
        self.exit(EXIT_USER_ERROR, f"error: {text}\n")


def make_parser(name: str) -> tuple[ModuleType, argparse.ArgumentParser]:
    """The one parser factory: (module, parser) of subcommand `name` (a key of SUBCOMMANDS), with the options
    every subcommand shares."""
    module_name, helptext = SUBCOMMANDS[name]
    module = importlib.import_module(module_name)
    parser = _Parser(prog=f"python -m megatron_prune {name}", description=helptext)
    module.add_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show every warning of torch, megatron-core and transformers, from every rank "
                             "(default: only those that matter, once, from rank 0)")
    return module, parser


def run_command(name: str, argv: list[str]) -> int:
    """Parse `argv` for subcommand `name` and run it; user errors are one line and exit 2."""
    from megatron_prune.cli.quiet import third_party_noise

    module, parser = make_parser(name)
    args = parser.parse_args(argv)
    verbose = vars(args).pop("verbose")
    with third_party_noise(verbose):
        return int(user_errors(module.run)(args) or 0)


def missing_dependency(e: ModuleNotFoundError, argv: list[str]) -> str | None:
    """One line saying how to run `argv` when this Python lacks a third-party module megatron_prune needs (a
    python3 outside the repository's .venv); None for a missing module of our own (a bug)."""
    top = (e.name or "").split(".")[0]
    if not top or top == "megatron_prune":
        return None
    root = Path(__file__).resolve().parents[2]
    venv = root / ".venv" / "bin" / "python"
    name = next((" ".join(argv[:n]) for n in (2, 1) if " ".join(argv[:n]) in SUBCOMMANDS), " ".join(argv[:1]))
    how = f"`{venv} -m megatron_prune {name} ...` (or `source {root}/.venv/bin/activate`)"
    if not venv.exists():
        how = f"`make install` in {root} first, then {how}"
    return f"{sys.executable} cannot import {top!r}, which megatron_prune needs: run {how}"
