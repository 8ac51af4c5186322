"""`prune` under torchrun with a failure injected into the distributed write, for
tests/dist/test_prune_write_errors.py:

    python -m megatron_prune.cli.launch --standalone --nproc-per-node 2 -m tests.dist.prune_write_cases MODE PRUNE_ARGS...

MODE: rank1-bug (a KeyError in rank 1's rank-file write), rank0-finalize-bug (a KeyError while rank 0 writes the
meta, after every rank file is written), rank1-disk-full (ENOSPC in rank 1's write: the user's disk).
"""

from __future__ import annotations

import errno
import os
import sys

from megatron_prune.checkpoint import megatron_io as mio


def _inject(mode: str) -> None:
    rank = int(os.environ.get("RANK", "0"))
    if mode == "rank1-bug" and rank == 1:
        def save_rank(root, *a, **k):
            return {}["internal"]  # a programming error (KeyError) in the middle of the write

        mio.save_rank = save_rank
    elif mode == "rank0-finalize-bug" and rank == 0:
        def write_meta(root, *a, **k):
            return {}["internal"]

        mio.write_meta = write_meta
    elif mode == "rank1-disk-full" and rank == 1:
        def save_rank(root, *a, **k):
            raise OSError(errno.ENOSPC, "No space left on device", str(root / "model_optim_rng.pt"))

        mio.save_rank = save_rank


if __name__ == "__main__":
    from megatron_prune.__main__ import main

    _inject(sys.argv[1])
    sys.exit(main(["prune", *sys.argv[2:]]))
