"""The shell commands README.md shows, and what each must satisfy: the helpers of the tests that walk them
(tests/unit/test_readme.py checks every command statically; tests/dist/test_readme_commands.py runs the runnable
ones after the quick demo).

How README.md marks commands, so that prose is never taken for one:
- A fenced block opened with ```` ```bash ```` holds commands that run as written after `make demo`, from the
  repository root, in a shell without the venv (PATH without .venv/bin): one command per line, a trailing `\\`
  continues it, `#` starts a comment. `make ...` lines there are the preconditions (`make demo`, `make test`) and
  are checked, not run.
- A fenced block opened with ```` ```bash template ```` holds examples for the reader's own files (a 7B checkpoint,
  `ckpt/...`): checked, not run.
- In any other fenced block (output, diagrams), a line that starts with `$ ` is a command (its output follows):
  checked, not run.
- An inline code span that starts like a command: `bash scripts/...` (or tools/, benchmarks/), `python -m
  megatron_prune ...`, `python benchmarks/...`, `.venv/bin/python ...`, `make TARGET`, `torchrun ...`, possibly
  after `VAR=value` settings: checked, not run. `...` and `[optional]` brackets may stand in such spans.

Checked means: the script, module, subcommand or make target exists; every `--flag` is one its `--help` lists; every
`VAR=` of a script that sources scripts/lib/env.sh is one it declares; no bare `torchrun` (not on PATH outside the
venv: use a script).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```", re.M | re.S)
_SETTINGS = r"(?:[A-Z_][A-Z0-9_]*=\S*\s+)*"
_COMMAND_START = re.compile(_SETTINGS + r"(?:bash\s+(?:scripts|tools|benchmarks|docker)/\S+|"
                            r"(?:\.venv/bin/)?python3?\s+(?:-m\s+megatron_prune\b|benchmarks/)|"
                            r"\.venv/bin/\w+|make\s+[\w-]+|torchrun\b)")
PYTHONS = ("python", "python3", ".venv/bin/python", ".venv/bin/torchrun", "torchrun")


@dataclass(frozen=True)
class Command:
    text: str
    line: int        # where it starts in README.md (1-based)
    runnable: bool   # in a ```bash block: runs as written after `make demo`

    def __str__(self) -> str:
        return f"README.md:{self.line}: {self.text}"


def commands(text: str | None = None) -> list[Command]:
    """Every command README.md shows, in order."""
    text = README.read_text() if text is None else text
    found: list[Command] = []
    prose, last = [], 0
    for m in _FENCE.finditer(text):
        prose.append((last, text[last:m.start()]))
        last = m.end()
        info, body = m.group(1).split(), m.group(2)
        start = text.count("\n", 0, m.start(2)) + 1
        if info[:1] in (["bash"], ["sh"]):
            found += _block_commands(body, start, runnable=info == ["bash"])
        else:
            found += [Command(ln[2:].strip(), start + i, False) for i, ln in enumerate(body.splitlines())
                      if ln.startswith("$ ")]
    prose.append((last, text[last:]))
    for offset, chunk in prose:
        for m in re.finditer(r"`([^`]+)`", chunk):
            span = " ".join(m.group(1).split())
            if _COMMAND_START.match(span) and " " in span:  # a lone program name is prose (`torchrun`)
                found.append(Command(span, text.count("\n", 0, offset + m.start()) + 1, False))
    return sorted(found, key=lambda c: c.line)


def _block_commands(body: str, start: int, runnable: bool) -> list[Command]:
    out, pending, first = [], "", 0
    for i, raw in enumerate(body.splitlines()):
        line = raw.split(" #")[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line.strip() and not pending:
            continue
        if not pending:
            first = start + i
        pending += " " + line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        out.append(Command(" ".join(pending.split()), first, runnable))
        pending = ""
    return out


# ---------------------------------------------------------------------------------------------- static checks
def problems(cmd: Command) -> list[str]:
    """What is wrong with a command: an unknown script / subcommand / target, flag or variable."""
    try:
        words = shlex.split(cmd.text)
    except ValueError as e:
        return [f"cannot split it ({e})"]
    settings = []
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        settings.append(words.pop(0).split("=", 1)[0])
    if not words:
        return ["no command"]
    program, args = words[0], words[1:]
    if program == "make":
        return [f"no make target {t!r}" for t in args[:1] if t not in make_targets()]
    if program == "bash":
        return _script_problems(args[0], args[1:], settings)
    if program == "torchrun":
        return ["bare `torchrun` is not on PATH outside the venv: use a script (scripts/eval.sh, "
                "scripts/train_recovery.sh, scripts/prune_llama.sh) or .venv/bin/torchrun"]
    if program in PYTHONS:
        return _python_problems(args)
    return [f"unknown program {program!r}"]


def flags_in(args: list[str]) -> list[str]:
    """The --flags of a command line, without `=value`, optional-brackets or placeholders."""
    out = []
    for a in args:
        a = a.strip("[]")
        if " " in a:  # a quoted value such as compress's --train-args "--lr 5e-4 ...", not a flag
            continue
        if a.startswith("--") and len(a) > 2:
            out.append(a.split("=", 1)[0])
    return out


@functools.lru_cache(maxsize=None)
def make_targets() -> frozenset[str]:
    return frozenset(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))


@functools.lru_cache(maxsize=None)
def help_flags(*argv: str) -> frozenset[str]:
    """Every --flag the --help of `argv` prints (run with the repository's Python)."""
    env = {**os.environ, "PYTHON": sys.executable, "COLUMNS": "200"}
    out = subprocess.run([*argv, "--help"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    listed = set(re.findall(r"--[\w-]+", out.stdout))
    listed |= {f"--no-{f[2:]}" for f in re.findall(r"--\[no-\]([\w-]+)", out.stdout)}
    listed |= {f"--{f}" for f in re.findall(r"--\[no-\]([\w-]+)", out.stdout)}
    return frozenset(listed)


def declared_variables(script: Path) -> set[str]:
    from megatron_prune.cli.env_check import _DECLARATION

    names = {"PYTHON", "PYTHONPATH"}
    for one, many in _DECLARATION.findall(script.read_text()):
        names.update([one] if one else many.split())
    return names


def _script_problems(path: str, args: list[str], settings: list[str]) -> list[str]:
    script = ROOT / path
    if not script.is_file():
        return [f"no script {path}"]
    found = [f"{path} has no flag {f}" for f in flags_in(args) if f not in help_flags("bash", str(script))]
    if "lib/env.sh" in script.read_text():
        known = declared_variables(script)
        found += [f"{path} reads no variable {v}" for v in settings if v not in known]
    return found


def _python_problems(args: list[str]) -> list[str]:
    if args[:1] == ["-m"] and len(args) > 1:
        module, rest = args[1], args[2:]
        if module == "megatron_prune":
            return _subcommand_problems(rest)
        if module.startswith("megatron_prune") and importlib.util.find_spec(module) is None:
            return [f"no module {module}"]
        if module == "megatron_prune.demo":
            return [f"the demo has no flag {f}" for f in flags_in(rest)
                    if f not in help_flags(sys.executable, "-m", module)]
        return []
    if args and args[0].endswith(".py"):
        if not (ROOT / args[0]).is_file():
            return [f"no file {args[0]}"]
        return [f"{args[0]} has no flag {f}" for f in flags_in(args[1:])
                if f not in help_flags(sys.executable, args[0])]
    return []


def _subcommand_problems(args: list[str]) -> list[str]:
    from megatron_prune.cli.commands import SUBCOMMANDS, make_parser

    if not args or args[0] in ("-h", "--help", "..."):
        return []
    name = next((" ".join(args[:n]) for n in (2, 1) if " ".join(args[:n]) in SUBCOMMANDS), None)
    if name is None:
        return [f"no subcommand {' '.join(args[:2])!r}"]
    _, parser = make_parser(name)
    known = parser._option_string_actions
    return [f"`{name}` has no flag {f}" for f in flags_in(args[len(name.split()):]) if f not in known]
