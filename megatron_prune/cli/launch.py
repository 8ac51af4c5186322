"""`python -m megatron_prune.cli.launch TORCHRUN_ARGS...`: torchrun for the shell scripts, with short failures.

Same arguments as `python -m torch.distributed.run`. The workers (entries wrapped by `cli.dist_entry`) print
their own one-line error; this launcher gives them a shared error directory and, when a worker fails, leaves
out torchrun's ChildFailedError traceback (about 40 lines that name no file): it prints a line and torchrun's
summary box only when no worker said what went wrong (e.g. one was killed by the OOM killer).
Exit code: the workers' (2 for a user error, 1 otherwise).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from megatron_prune.cli.dist_entry import ERROR_DIR_ENV, read_errors
from megatron_prune.errors import EXIT_BUG


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="megatron_prune-errors-") as errors:
        os.environ[ERROR_DIR_ENV] = errors  # inherited by the workers
        try:
            run(args)
            return 0
        except ChildFailedError as e:
            return _summary(e, Path(errors))


def _summary(e, errors: Path) -> int:
    reported = read_errors(errors)
    rank, failure = e.get_first_failure()
    if reported and (rank in reported or failure.exitcode >= 0):  # (ranks that agreed on a failure exit quietly)
        return max(code for code, _ in reported.values())
    # the first rank to fail said nothing: killed (e.g. by the OOM killer) or died in native code
    how = f"was killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited with code {failure.exitcode}"
    print(f"error: worker rank {rank} (pid {failure.pid}) {how} without a report", file=sys.stderr)
    if not reported:
        print(e.format_msg(), file=sys.stderr)
    return max([EXIT_BUG, *(code for code, _ in reported.values())])


if __name__ == "__main__":
    sys.exit(main())
