"""The checkpoint layer's domain error (its own module: readers and writers of every format raise it, and importing
it must not pull in any of them)."""

from __future__ import annotations

from megatron_prune.errors import UserError


class CheckpointError(UserError, ValueError):
    """A checkpoint on disk that is missing, truncated or inconsistent; the message names the file."""
