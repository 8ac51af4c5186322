"""`python -m megatron_prune.cli.prelaunch [OPTIONS] [TORCHRUN OPTIONS] -- SUBCOMMAND ARGS...`: check, then torchrun.

What every shell script that starts torchrun runs (scripts/lib/env.sh `mp_torchrun`): the subcommand's arguments
are parsed by its own parser and checked by its `preflight(args, launch)` in this one process, so a missing flag, a
bad size, a missing checkpoint or data file, or a process count that does not fit TP x PP is one line naming the
flag (or the script's variable) before any worker starts. `preflight` returns the processes per node, and torchrun
then starts through cli/launch.py (one report from whichever rank fails). A subcommand's `one_process(args)`
(prune's --check-only and --dry-run) runs it here instead, without torchrun.

OPTIONS (before the torchrun options):
  --nproc N          processes per node the user asked for (empty: the subcommand's default)
  --nproc-name NAME  how the user set N, for messages (a script's variable, e.g. NPROC)
  --print            print the torchrun command instead of running it (a script's DRY_RUN=1)
TORCHRUN OPTIONS: --standalone, or --nnodes / --node-rank / --master-addr / --rdzv-* (no --nproc-per-node).
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass

from megatron_prune.errors import InputError


@dataclass(frozen=True)
class Launch:
    """The process count a user asked for, and how they asked (for messages in their own words)."""

    nproc: int | None = None       # processes per node; None: the subcommand's default
    nnodes: int = 1
    name: str = "--nproc-per-node"

    def processes(self, unit: int, what: str) -> int:
        """Processes per node for a job whose world must be a multiple of `unit` (`what` spells it out, e.g.
        "--tp x --pp = 2 x 1"): the user's count, checked; else the node's GPUs with CUDA; else `unit`."""
        if self.nproc is not None:
            if self.nproc < 1 or (self.nproc * self.nnodes) % unit:
                nodes = f" x {self.nnodes} nodes" if self.nnodes > 1 else ""
                raise InputError(f"{self.name} {self.nproc}{nodes} processes is not a multiple of {what}: set "
                                 f"{self.name} to a multiple of {unit}, or leave it unset")
            return self.nproc
        import torch

        if torch.cuda.is_available():
            gpus = torch.cuda.device_count()
            if (gpus * self.nnodes) % unit:
                raise InputError(f"this node's {gpus} GPUs are not a multiple of {what}: set {self.name} to a "
                                 f"multiple of {unit}")
            return gpus
        if self.nnodes > 1 and unit % self.nnodes:
            raise InputError(f"{what} processes do not spread over {self.nnodes} nodes: set {self.name}")
        return max(1, unit // self.nnodes)


def _split(argv: list[str]) -> tuple[Launch, bool, list[str], list[str]]:
    """(launch, print only, torchrun options, SUBCOMMAND ARGS)."""
    if "--" not in argv:
        raise InputError("usage: python -m megatron_prune.cli.prelaunch [OPTIONS] [TORCHRUN OPTIONS] -- "
                         "SUBCOMMAND ARGS...")
    cut = argv.index("--")
    opts, command = argv[:cut], argv[cut + 1:]
    nproc, name, print_only, torchrun = None, "--nproc-per-node", False, []
    i = 0
    while i < len(opts):
        if opts[i] == "--nproc":
            nproc, i = opts[i + 1], i + 2
        elif opts[i] == "--nproc-name":
            name, i = opts[i + 1], i + 2
        elif opts[i] == "--print":
            print_only, i = True, i + 1
        else:
            torchrun.append(opts[i])
            i += 1
    nnodes = int(_value(torchrun, "--nnodes") or 1)
    if nproc:
        try:
            nproc = int(nproc)
        except ValueError:
            raise InputError(f"{name} must be a number of processes, got {nproc!r}") from None
    return Launch(nproc=nproc or None, nnodes=nnodes, name=name), print_only, torchrun, command


def _value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def main(argv: list[str] | None = None) -> int:
    from megatron_prune.cli.commands import missing_dependency

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except ModuleNotFoundError as e:
        message = missing_dependency(e, argv[argv.index("--") + 1:] if "--" in argv else [])
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2


def _main(argv: list[str]) -> int:
    from megatron_prune.cli.commands import make_parser
    from megatron_prune.cli.common import name_env_flags, user_errors
    from megatron_prune.errors import user_error_message
    from megatron_prune.cli.quiet import third_party_noise

    try:
        launch, print_only, torchrun, command = _split(argv)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not command or command[0] not in ("prune", "train", "eval"):
        print(f"error: prelaunch runs prune, train or eval, not {' '.join(command[:1])!r}", file=sys.stderr)
        return 2
    module, parser = make_parser(command[0])
    args = parser.parse_args(command[1:])
    verbose = vars(args).pop("verbose")
    with third_party_noise(verbose):
        if getattr(module, "one_process", lambda _: False)(args):
            return int(user_errors(module.run)(args) or 0)
        try:
            nproc = module.preflight(args, launch)
        except Exception as e:  # noqa: BLE001 - a user error is one line; anything else keeps its traceback
            message = user_error_message(e)
            if message is None:
                raise
            print(f"error: {name_env_flags(message)}", file=sys.stderr)
            return 2
    cmd = [*torchrun, "--nproc-per-node", str(nproc), "-m", "megatron_prune", *command]
    if print_only:
        print(shlex.join([sys.executable, "-m", "megatron_prune.cli.launch", *cmd]))
        return 0
    import torch.distributed.run  # noqa: F401 - torchrun's loggers exist before third_party_noise quiets them

    from megatron_prune.cli import launch as torchrun_launch

    with third_party_noise(verbose, launcher=True):
        return torchrun_launch.main(cmd)


if __name__ == "__main__":
    sys.exit(main())
