"""Shared CLI plumbing: turn expected user errors into one-line messages and exit code 2."""

from __future__ import annotations

import functools
import sys
from typing import Callable

from megatron_prune.checkpoint.atomic import OutputExistsError
from megatron_prune.checkpoint.hf_io import CheckpointError
from megatron_prune.config.shape import ShapeError

USER_ERRORS = (ShapeError, CheckpointError, OutputExistsError, FileNotFoundError, ValueError, KeyError)


def user_errors(run: Callable[..., int]) -> Callable[..., int]:
    """Decorator for `run(args)`: expected errors print `error: ...` (no traceback) and return 2."""

    @functools.wraps(run)
    def wrapper(*a, **k) -> int:
        try:
            return run(*a, **k)
        except USER_ERRORS as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            print(f"error: {msg}", file=sys.stderr)
            return 2

    return wrapper


def add_dtype(parser, help_default: str) -> None:
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32", "bfloat16", "float16", "float32"],
                        default=None, help=f"output dtype (default: {help_default})")
