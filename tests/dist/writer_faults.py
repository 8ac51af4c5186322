"""A subcommand run with a fault injected into its rank-file writes on one rank, for tests/dist/test_rank_errors.py:

    python -m megatron_prune.cli.launch --standalone --nproc-per-node 2 -m tests.dist.writer_faults FAULT RANK \
        SUBCOMMAND ARGS...

FAULT: `bug` (a KeyError inside the write: a programming error) or `enospc` (the disk fills up half-way through
the rank file: a user error). RANK: the rank that meets it; the other ranks write normally.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

from megatron_prune.checkpoint import megatron_io as mio


def main(fault: str, rank: int, argv: list[str]) -> int:
    real = mio.torch_save

    def faulty(obj, path) -> None:
        if int(os.environ.get("RANK", "0")) != rank:
            return real(obj, path)
        if fault == "bug":
            raise KeyError("internal")
        Path(path).write_bytes(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    mio.torch_save = faulty
    from megatron_prune.__main__ import main as cli

    return cli(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), sys.argv[3:]))
