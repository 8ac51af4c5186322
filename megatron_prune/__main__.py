"""`python -m megatron_prune SUBCOMMAND ...`: dispatch to the subcommands of cli/commands.py (imported lazily, so
`--help` stays fast), usage when none is named, and one line instead of a traceback in a Python that lacks the
dependencies."""

from __future__ import annotations

import importlib.util
import sys

from megatron_prune.cli.commands import SUBCOMMANDS, make_parser, missing_dependency, run_command

__all__ = ["SUBCOMMANDS", "main", "make_parser"]


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
    try:
        return _dispatch(argv)
    except ModuleNotFoundError as e:
        message = missing_dependency(e, argv)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2


def _dispatch(argv: list[str]) -> int:
    cmds = _available()
    for words in (2, 1):
        name = " ".join(argv[:words])
        if len(argv) >= words and name in cmds:
            return run_command(name, argv[words:])
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
