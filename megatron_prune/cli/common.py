"""Shared CLI plumbing: the one user-error contract of every entry point.

`UserError` (and OS errors about the user's files: missing, unreadable, full disk, read-only) print one line
`error: ...` and exit 2; anything else is a programming error and keeps its traceback (exit 1).
"""

from __future__ import annotations

import errno
import functools
import os
import re
import sys
from typing import Callable

from megatron_prune.errors import EXIT_USER_ERROR, UserError

# OS errors that describe the user's files or machine, not a bug: reported as one line.
_USER_OS_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
                   errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP}


def user_error_message(e: BaseException) -> str | None:
    """The one-line message for an error the user can fix, or None for a programming error."""
    if isinstance(e, UserError):
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, OSError) and e.errno in _USER_OS_ERRNOS:
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror or e}"
    return None


def name_env_flags(message: str) -> str:
    """Name each flag in `message` with the variable that sets it: the shell entry points (scripts/lib/env.sh)
    export MEGATRON_PRUNE_ENV_FLAGS="--save=SAVE ...", so `--save` reads `--save (or SAVE)`."""
    for pair in os.environ.get("MEGATRON_PRUNE_ENV_FLAGS", "").split():
        flag, _, var = pair.partition("=")
        message = re.sub(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", f"{flag} (or {var})", message)
    return message


def user_errors(run: Callable[..., int]) -> Callable[..., int]:
    """Decorator for `run(args)`: user errors print `error: ...` (no traceback) and return 2; others propagate."""

    @functools.wraps(run)
    def wrapper(*a, **k) -> int:
        try:
            return run(*a, **k)
        except (UserError, OSError) as e:
            msg = user_error_message(e)
            if msg is None:
                raise
            print(f"error: {msg}", file=sys.stderr)
            return EXIT_USER_ERROR

    return wrapper


def add_dtype(parser, help_default: str) -> None:
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32", "bfloat16", "float16", "float32"],
                        default=None, help=f"output dtype (default: {help_default})")


def add_ckpt_format(parser) -> None:
    """Megatron-LM's flag for the output format of a Megatron checkpoint."""
    parser.add_argument("--ckpt-format", choices=["torch", "torch_dist"], default="torch",
                        help="output format, as Megatron-LM names it: torch (legacy rank files; default) or "
                             "torch_dist (megatron-core dist checkpoint: loads at any TP/PP)")
