"""torchrun --nproc-per-node N -m megatron_prune eval --load CKPT --text-file FILE [--tokenizer DIR] ...

Mean next-token loss and perplexity of a Megatron checkpoint over a text file. N = TP x PP x DP of the
checkpoint's TP and PP; DP ranks split the windows. Padded vocabulary entries are excluded from the softmax, so
the number equals HF's on the exported model."""

from __future__ import annotations

import json
import sys


def add_arguments(p) -> None:
    p.add_argument("--load", required=True, help="Megatron checkpoint directory")
    p.add_argument("--text-file", required=True,
                   help="UTF-8 text to evaluate on (.txt, or .jsonl whose 'text' fields are joined by blank lines)")
    p.add_argument("--tokenizer", default=None,
                   help="HF tokenizer directory or SentencePiece .model (default: the checkpoint's own files)")
    p.add_argument("--seq-length", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate at most this many tokens")
    p.add_argument("--micro-batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--use-te", action="store_true", help="build Transformer Engine layers (GPU with TE only)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _read_meta(load: str):
    import torch.distributed as dist

    from megatron_prune.checkpoint import megatron_io as mio
    from megatron_prune.errors import UserError

    meta, world = mio.read_meta(load), dist.get_world_size()
    if world % (meta.tp * meta.pp):
        raise UserError(f"{load}: tp={meta.tp} x pp={meta.pp} does not divide the {world} processes "
                        f"(torchrun --nproc-per-node: a multiple of {meta.tp * meta.pp})")
    return meta


def preflight(args, launch) -> int:
    """In the launching process (cli/prelaunch.py): the checkpoint, the text and its tokenizer, and the process
    count (a multiple of the checkpoint's TP x PP; extra ranks split the windows). Returns processes per node."""
    from megatron_prune.checkpoint import megatron_io as mio
    from megatron_prune.data.text import read_windows

    meta = mio.read_meta(args.load)
    read_windows(args.text_file, args.tokenizer or args.load, args.seq_length, args.max_tokens)
    return launch.processes(meta.tp * meta.pp, f"{args.load}'s tp x pp = {meta.tp} x {meta.pp}")


def run(args) -> int:
    from megatron_prune.cli.dist_entry import run_entry

    return run_entry(lambda: _run(args))


def _run(args) -> int:
    """On every rank; failures are reported once by cli.dist_entry (user errors: one line, exit 2)."""
    from megatron_prune.data.text import read_windows
    from megatron_prune.model.agree import agree
    from megatron_prune.model.dist import init_model_parallel, init_process_group
    from megatron_prune.model.evaluate import evaluate_megatron
    from megatron_prune.model.load import load_model

    init_process_group()
    meta = agree(_read_meta, args.load)
    windows = agree(read_windows, args.text_file, args.tokenizer or args.load, args.seq_length, args.max_tokens)
    info = init_model_parallel(meta.tp, meta.pp)
    model, meta = agree(load_model, args.load, info, seq_length=args.seq_length, use_te=args.use_te)
    result = evaluate_megatron(model, windows, meta.shape.vocab_size, args.micro_batch_size,
                               progress=info.rank == 0 and not args.no_progress)
    if info.rank == 0:
        if args.json:
            print(json.dumps({"load": args.load, **result.to_dict()}))
        else:
            print(f"{args.load}: loss {result.loss:.6f}  perplexity {result.perplexity:.4f}  "
                  f"({result.tokens} tokens, {result.windows} windows of {args.seq_length})")
    sys.stdout.flush()
    return 0
