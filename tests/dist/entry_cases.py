"""Torchrun entries that fail on purpose, for tests/dist/test_rank_errors.py:

    python -m megatron_prune.cli.launch --standalone --nproc-per-node 2 -m tests.dist.entry_cases MODE

MODE: agreed-user (rank 1 fails a pre-collective check), local-user (rank 1 raises a user error while rank 0 waits
in a collective), agreed-bug / local-bug (a programming error, TypeError, on rank 1 in the same two places).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from megatron_prune.cli.dist_entry import run_entry
from megatron_prune.errors import UserError
from megatron_prune.model.agree import agree


def _fail(kind: str) -> None:
    if dist.get_rank() != 1:
        return
    if kind == "user":
        raise UserError("/data/ckpt/release/mp_rank_01/model_optim_rng.pt: cannot load (truncated)")
    len(None)  # a programming error (TypeError)


def body(mode: str) -> int:
    from megatron_prune.model.dist import init_process_group

    init_process_group()
    where, kind = mode.split("-")
    if where == "agreed":
        agree(_fail, kind)
    else:
        _fail(kind)
    dist.all_reduce(torch.ones(1))  # rank 0 waits here for a rank that never comes
    return 0


if __name__ == "__main__":
    sys.exit(run_entry(lambda: body(sys.argv[1])))
