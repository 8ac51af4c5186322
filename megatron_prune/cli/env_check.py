"""`python -m megatron_prune.cli.env_check WHO SCRIPT DECLARED...`: what a shell entry point checks before it runs
(scripts/lib/env.sh `mp_check_env`; standard library only, so it runs in any Python):

1. this Python has megatron_prune's dependencies (torch, megatron-core); if not, one line saying how to get them,
   worded by WHO chose the Python: `user` (PYTHON was set), `venv` (the repository's .venv) or `system` (python3);
2. no environment variable that the script would silently ignore although it was meant for it.

Every script declares its variables (`mp_flag FLAG VAR`, `mp_list`, `mp_switch`, `mp_vars VAR...`). A variable in
the environment is refused when it is none of them and looks like one:
- a near miss of one of them (`HIDEN_SIZE_REMAIN` for `HIDDEN_SIZE_REMAIN`): at most one edit (insert, delete,
  replace, or swap two neighbours) for names up to 7 letters, two for longer ones; names under 4 letters are never
  compared (`TP` is one edit from `TZ`);
- or it ends in a word that ends 3 or more of the script's names (`NUM_HEADS_REMAIN`: prune_llama.sh has five
  `*_REMAIN` variables).
False positives from unrelated variables are avoided in two ways. The thresholds above leave the usual environment
alone (PATH, HOME, LANG, TERM, SHELL, PWD, INPUTRC, HF_HOME, MKL_NUM_THREADS, ...: all tested). A variable any
other script of this repository declares is never refused: users export LOAD / SAVE / TP once for several scripts.
The message names the closest setting and says how to go on (unset it).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_DECLARATION = re.compile(r"^\s*mp_(?:flag|list|switch)\s+\S+\s+(\w+)|^\s*mp_vars\s+([\w ]+)", re.M)
MIN_LENGTH = 4
FAMILY = 3


def distance(a: str, b: str, limit: int) -> int:
    """Optimal-string-alignment distance (Damerau-Levenshtein: a swap of neighbours is one edit), capped at
    limit + 1."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    prev2, prev = None, list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb))
            if prev2 is not None and i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        prev2, prev = prev, cur
    return min(prev[-1], limit + 1)


def _limit(a: str, b: str) -> int:
    return 1 if min(len(a), len(b)) <= 7 else 2


def declared_elsewhere(root: Path = ROOT) -> set[str]:
    """Every variable any shell entry point of this repository declares."""
    names: set[str] = set()
    for script in [*root.glob("scripts/*.sh"), *root.glob("tools/*.sh")]:
        for one, many in _DECLARATION.findall(script.read_text()):
            names.update([one] if one else many.split())
    return names


def suspects(environ: list[str], declared: list[str], elsewhere: set[str]) -> list[tuple[str, str]]:
    """[(variable, the closest declared name)] for the variables in `environ` that look meant for this script."""
    mine = set(declared)
    words = [n.rsplit("_", 1)[-1] for n in mine if "_" in n]
    families = {w for w in words if words.count(w) >= FAMILY}
    out = []
    for name in sorted(set(environ) - mine - elsewhere):
        if len(name) < MIN_LENGTH or not re.fullmatch(r"[A-Z][A-Z0-9_]*", name):
            continue
        near = [(distance(name, d, _limit(name, d)), d) for d in mine if len(d) >= MIN_LENGTH]
        near = [(k, d) for k, d in near if k <= _limit(name, d)]
        in_family = "_" in name and name.rsplit("_", 1)[-1] in families
        if near or in_family:
            closest = min(near)[1] if near else _most_alike(name, mine)
            out.append((name, closest))
    return out


def missing_dependency(who: str) -> str | None:
    """One line when this Python cannot run megatron_prune (no torch or megatron-core), else None."""
    import importlib.util

    lacks = [m for m in ("torch", "megatron") if importlib.util.find_spec(m) is None]
    if not lacks:
        return None
    what = f"cannot import {' or '.join(lacks)}"
    if who == "user":
        return (f"PYTHON={sys.executable} {what}: set PYTHON to a Python with megatron_prune's dependencies, or unset "
                f"it to use {ROOT}/.venv (`make install` creates it)")
    if who == "venv":
        return f"{sys.executable} {what}: rerun `make install` in {ROOT}"
    return (f"no {ROOT}/.venv and {sys.executable} {what}: run `make install` in {ROOT} first "
            f"(the scripts then use .venv)")


def _most_alike(name: str, names: set[str]) -> str:
    """The name sharing most underscore-separated words with `name` (then the fewest edits)."""
    words = set(name.split("_"))
    return min(names, key=lambda d: (-len(words & set(d.split("_"))), distance(name, d, len(name) + len(d)), d))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    who, script, declared = argv[0], argv[1], argv[2:]
    lacking = missing_dependency(who)
    if lacking:
        print(f"error: {lacking}", file=sys.stderr)
        return 2
    found = suspects(list(os.environ), declared, declared_elsewhere())
    if not found:
        return 0
    said = "; ".join(f"{name} is not a setting of {script} (did you mean {closest}?)" for name, closest in found)
    it = "it" if len(found) == 1 else "them"
    print(f"error: {said}: unset {it} to go on (`bash {script} --help` lists the settings)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
