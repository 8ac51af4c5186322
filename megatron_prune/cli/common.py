"""Shared CLI plumbing: `user_errors`, which applies the one user-error contract (megatron_prune.errors) to an
entry point: a user error prints one line `error: ...` and returns 2; anything else keeps its traceback (exit 1).
`python -m megatron_prune` (__main__) applies it to every subcommand; torchrun entries use cli.dist_entry.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from typing import Callable

from megatron_prune.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, UserError, user_error_message


def name_env_flags(message: str) -> str:
    """Name each flag in `message` with the variable that sets it: the shell entry points (scripts/lib/env.sh)
    export MEGATRON_PRUNE_ENV_FLAGS="--save=SAVE ...", so `--save` reads `--save (or SAVE)`."""
    for pair in os.environ.get("MEGATRON_PRUNE_ENV_FLAGS", "").split():
        flag, _, var = pair.partition("=")
        message = re.sub(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", f"{flag} (or {var})", message)
    return message


# Set by cli/launch.py for its torchrun workers: where each rank notes the error it reported (cli/dist_entry.py).
ERROR_DIR_ENV = "MEGATRON_PRUNE_ERROR_DIR"


def peer_rank() -> bool:
    """A torchrun worker other than rank 0: a message every rank would print alike is left to rank 0."""
    return "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("RANK", "0")) != 0


def user_errors(run: Callable[..., int]) -> Callable[..., int]:
    """Decorator for `run(args)`: user errors print `error: ...` (no traceback) and return 2; others propagate.
    Ctrl-C prints `error: interrupted` and returns 130 (writers have removed their partial output by then)."""

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
        except KeyboardInterrupt:
            if not peer_rank():  # under torchrun every rank gets the SIGINT: rank 0 says it
                print("error: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED

    return wrapper


def add_dtype(parser, help_default: str) -> None:
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32", "bfloat16", "float16", "float32"],
                        default=None, help=f"output dtype (default: {help_default})")
