"""python -m megatron_prune vocab-freq --tokenizer PATH --input FILE [FILE ...] --output counts.json [--workers N]"""

from __future__ import annotations

import os
from pathlib import Path

from megatron_prune.errors import InputError
from megatron_prune.checkpoint.atomic import OutputExistsError, check_no_overlap, remove_stale_temps


def add_arguments(p) -> None:
    p.add_argument("--tokenizer", required=True,
                   help="SentencePiece .model file, HF tokenizer.json, or an HF tokenizer directory")
    p.add_argument("--input", nargs="+", required=True,
                   help=".jsonl / .json / .txt files (optionally .zst), globs allowed; read as `preprocess` does")
    p.add_argument("--output", required=True, help="counts file to write (JSON)")
    p.add_argument("--json-key", default="text", help="JSON field holding the document text (default: text)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="tokenizer processes (default: min(8, CPUs))")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from megatron_prune.vocab.counts import count_tokens, write_counts

    from megatron_prune.data.preprocess import expand_inputs

    check_no_overlap(args.output, [*expand_inputs(args.input), args.tokenizer], what="--output")
    remove_stale_temps(args.output)
    if Path(args.output).exists() and not args.overwrite:
        raise OutputExistsError(f"{args.output}: exists (pass --overwrite to replace it)")
    if args.workers < 1:
        raise InputError(f"--workers must be >= 1, got {args.workers}")
    folder = Path(args.output).absolute().parent
    if not folder.is_dir():  # checked before counting the corpus, not when the result is written
        raise InputError(f"--output {args.output}: no such folder {folder} (create it first)")
    counts = count_tokens(args.tokenizer, args.input, args.json_key, args.workers, not args.no_progress)
    write_counts(args.output, counts)
    seen = sum(1 for c in counts.counts if c)
    print(f"wrote {args.output}: {counts.documents} documents, {counts.total:,} tokens, "
          f"{seen} of {len(counts.counts)} ids seen")
    return 0
