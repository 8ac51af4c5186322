"""python -m megatron_prune preprocess --input FILES... --tokenizer PATH --output-prefix PREFIX [...]

Tokenize jsonl / jsonl.zst (the Pile's format) / txt (one document per blank-line-separated paragraph)
into a megatron-core indexed dataset: PREFIX_{json-key}_document.bin/.idx, or
PREFIX_{json-key}_sentence.bin/.idx with --split-sentences, as Megatron-LM's preprocess_data.py names them."""

from __future__ import annotations

import argparse
import os
import warnings


def add_arguments(p) -> None:
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="input files (.jsonl, .json, .txt, each optionally .zst); globs allowed, quote them")
    p.add_argument("--json-key", default="text", help="JSON key holding the document text (default: text)")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model file or HF tokenizer directory")
    p.add_argument("--output-prefix", required=True,
                   help="output path prefix; _{json-key}_document or _{json-key}_sentence is appended")
    # --no-X forms let a later flag override an earlier one (tools/preprocess_data.sh appends EOD by default)
    p.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=False,
                   help="append the EOS token to every document (default: no)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help=f"tokenizer processes (default: the CPU count, {os.cpu_count()})")
    p.add_argument("--split-sentences", action=argparse.BooleanOptionalAction, default=False,
                   help="one sequence per sentence (NLTK punkt_tab; offline data via NLTK_DATA; default: no)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from megatron_prune.data.preprocess import PreprocessConfig, preprocess

    # megatron-core warns about optional CUDA libraries on import; irrelevant for writing data.
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) .*not installed")
    cfg = PreprocessConfig(inputs=args.input, tokenizer=args.tokenizer, output_prefix=args.output_prefix,
                           json_key=args.json_key, append_eod=args.append_eod, workers=args.workers,
                           split_sentences=args.split_sentences, overwrite=args.overwrite,
                           progress=not args.no_progress)
    stats = preprocess(cfg)
    print(f"{stats.prefix}.bin/.idx: {stats.documents} documents, {stats.sequences} sequences, "
          f"{stats.tokens} tokens ({stats.dtype}), {stats.skipped_empty} empty documents skipped; "
          f"{stats.docs_per_s:.0f} docs/s, {stats.mb_per_s:.2f} MB/s")
    return 0
