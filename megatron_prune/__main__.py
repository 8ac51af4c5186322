"""`python -m megatron_prune SUBCOMMAND ...`: a table of subcommands, each a module with
`add_arguments(parser)` and `run(args) -> int`. Modules are imported lazily so `--help` stays fast
(megatron-core takes seconds to import)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

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
    "megatron-lm-args": ("megatron_prune.cli.megatron_lm_args",
                         "print the Megatron-LM pretrain_gpt.py flags that load a checkpoint as the model it is"),
}


class _Parser(argparse.ArgumentParser):
    """A usage error is one line `error: ...` with exit code 2, like every other user error. The shell entry points
    (scripts/lib/env.sh) export which variable sets which flag, MEGATRON_PRUNE_ENV_FLAGS="--save=SAVE ...", so a
    missing or bad flag is named with its variable: `--save (or SAVE)`."""

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


def _available() -> dict[str, tuple[str, str]]:
    """Subcommands whose module exists in this checkout."""
    out = {}
    for name, (mod, helptext) in SUBCOMMANDS.items():
        if importlib.util.find_spec(mod) is not None:
            out[name] = (mod, helptext)
    return out


def _usage(cmds: dict[str, tuple[str, str]]) -> str:
    width = max((len(n) for n in cmds), default=10)
    lines = ["usage: python -m megatron_prune SUBCOMMAND [options]   (SUBCOMMAND --help for its options)", "",
             "subcommands:"]
    lines += [f"  {n.ljust(width)}  {h}" for n, (_, h) in cmds.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmds = _available()
    for words in (2, 1):
        name = " ".join(argv[:words])
        if len(argv) >= words and name in cmds:
            module = importlib.import_module(cmds[name][0])
            parser = _Parser(prog=f"python -m megatron_prune {name}", description=cmds[name][1])
            module.add_arguments(parser)
            args = parser.parse_args(argv[words:])
            return int(user_errors(module.run)(args) or 0)
    group = {n: v for n, v in cmds.items() if argv and n.split()[0] == argv[0] and " " in n}
    if group:  # "convert --help" (or "convert" alone): list that command's subcommands
        asked = argv[1:2] in (["-h"], ["--help"])
        if not asked:
            print(f"error: {argv[0]} needs one of its subcommands\n", file=sys.stderr)
        print(_usage(group).replace("SUBCOMMAND", f"{argv[0]} SUBCOMMAND", 1), file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    if argv and argv[0] not in ("-h", "--help"):
        print(f"error: unknown subcommand {' '.join(argv[:2])!r}\n", file=sys.stderr)
        print(_usage(cmds), file=sys.stderr)
        return 2
    print(_usage(cmds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
