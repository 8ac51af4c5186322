"""Every rank checks what it will read, then all ranks agree on the outcome, before any collective depends on it.

    point = agree(find_resume_point, load, save)   # on every rank: returns the value, or raises RankFailure on
                                                   # EVERY rank when any rank failed (rank 0 reports it)

Without this, a bad file on rank 1 kills rank 1 while the others wait in a collective: they die of "Connection
closed by peer" and the user never sees which file was bad. `agree` costs one small all-gather of None / a
one-line message; with one process it is a plain call (the original exception propagates).
"""

from __future__ import annotations

import traceback
from typing import Any, Callable, TypeVar

import torch.distributed as dist

from megatron_prune.errors import user_error_message

T = TypeVar("T")


class RankFailure(Exception):
    """Raised on every rank by `agree` when a rank failed; `cli.dist_entry` reports it once."""

    def __init__(self, rank: int, user: bool, message: str, trace: str | None = None):
        super().__init__(f"rank {rank}: {message}")
        self.rank, self.user, self.message, self.trace = rank, user, message, trace


def is_user_error(e: BaseException) -> bool:
    """The one contract (megatron_prune.errors): UserError, and OS errors about the user's files."""
    return user_error_message(e) is not None


def one_line(e: BaseException) -> str:
    """The one-line message of a user error (else the exception's first line)."""
    msg = user_error_message(e)
    if msg is None:
        lines = str(e).splitlines()
        msg = lines[0] if lines else type(e).__name__
    return msg


def everywhere(e: BaseException) -> BaseException:
    """Mark an error that every rank raises identically (after a collective decision): reported by rank 0 only."""
    e.on_every_rank = True
    return e


def agree(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs) on this rank; if it raises on any rank, RankFailure (of the lowest failing rank)
    on all. Call it where every rank arrives (before a collective that a failure would leave hanging)."""
    status, error = None, None
    try:
        result = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - reported to every rank below
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            raise
        error = e
        user = is_user_error(e)
        status = (user, one_line(e) if user else f"{type(e).__name__}: {one_line(e)}",
                  None if user else traceback.format_exc())
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return result
    statuses: list = [None] * dist.get_world_size()
    dist.all_gather_object(statuses, status)
    failed = [(r, s) for r, s in enumerate(statuses) if s is not None]
    if failed:
        rank, (user, message, trace) = failed[0]
        raise RankFailure(rank, user, message, trace) from error
    return result


def check_identical(value: str, what: str) -> None:
    """Every rank must hold the same `value` (a plan fingerprint, a choice): a divergence is a bug, raised on
    every rank with all ranks' values."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, value)
    if len(set(everyone)) != 1:
        raise RuntimeError(f"ranks made different {what}: {everyone}")
