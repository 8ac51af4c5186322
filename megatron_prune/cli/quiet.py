"""Which third-party warnings a user sees: the one owner of that policy, as a scoped context for entry points.

    with third_party_noise(verbose=args.verbose):
        run(args)

Quiet by default: the warnings in NOISE (listed with why they do not matter to a user of this tool) and deprecations
are dropped, any other warning is printed once per message, and only from rank 0 (under torchrun every rank would
print the same text); the other ranks also raise torch / megatron-core / transformers loggers to ERROR. `-v` /
`--verbose` (every subcommand has it) leaves Python's defaults alone: every warning from every rank. Nothing happens
at import time; everything changed is restored when the context ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from typing import Iterator

# (message regex, why it does not matter to a user of this tool)
NOISE: tuple[tuple[str, str], ...] = (
    (r".*(Transformer Engine|Apex) (and Apex )?(are|is) not installed",
     "optional GPU accelerators; absent on CPU and with the local spec by design"),
    (r"full scope is deprecated",
     "megatron-core's TransformerConfig warns about its own default cuda_graph_scope"),
    (r"When using async grad allreduce it is recommended to set the environment variable CUDA_DEVICE_MAX_CONNECTIONS",
     "a megatron-core performance hint that tensor-parallel layers print on every build"),
    (r"Mismatch dtype between input and weight",
     "torch's CPU rms_norm falls back from its fused kernel for bf16 inputs with fp32 weights (mixed precision)"),
)

# Deprecations speak to the code that calls an API (ours), not to the user; Python hides most of them by default too.
QUIET_CATEGORIES = (DeprecationWarning, PendingDeprecationWarning, FutureWarning, ImportWarning, ResourceWarning)
THIRD_PARTY_LOGGERS = ("megatron", "torch", "transformers")
# torchrun's agent logs a failed worker at ERROR ("failed (exitcode: 2) local_rank: 0 ..."); cli/launch.py already
# reports what the workers said, so outside --verbose its loggers are raised past ERROR.
LAUNCHER_LOGGERS = "torch.distributed.elastic"


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


@contextlib.contextmanager
def third_party_noise(verbose: bool = False, launcher: bool = False) -> Iterator[None]:
    """Filter third-party warnings while the block runs (see the module docstring); `launcher`: this process runs
    torchrun's agent, whose per-worker failure logs are left out too."""
    if verbose:
        yield
        return
    with warnings.catch_warnings(), _env("TRANSFORMERS_VERBOSITY", None if rank() == 0 else "error"), \
            _levels(THIRD_PARTY_LOGGERS if rank() != 0 else (), logging.ERROR), \
            _levels(_existing(LAUNCHER_LOGGERS) if launcher else (), logging.CRITICAL + 1):
        if rank() != 0:
            warnings.simplefilter("ignore")
        else:
            if not sys.warnoptions:  # -W / PYTHONWARNINGS given by the user win
                warnings.simplefilter("once")
                for category in QUIET_CATEGORIES:
                    warnings.simplefilter("ignore", category)
            for pattern, _why in NOISE:
                warnings.filterwarnings("ignore", message=pattern)
        yield


def _existing(prefix: str) -> tuple[str, ...]:
    """Loggers under `prefix` created so far (torch's elastic modules set each one's own level at import)."""
    return (prefix, *(n for n in logging.root.manager.loggerDict if n.startswith(prefix + ".")))


@contextlib.contextmanager
def _levels(names: tuple[str, ...], level: int) -> Iterator[None]:
    saved = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(max(level, logging.getLogger(n).level))
    try:
        yield
    finally:
        for n, old in saved.items():
            logging.getLogger(n).setLevel(old)


@contextlib.contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    """Set an environment variable for the block (None: leave it); a value the user set is kept."""
    if value is None or name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)
