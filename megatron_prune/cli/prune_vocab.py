"""python -m megatron_prune prune-vocab --counts counts.json (--keep N | --keep-min N) --tokenizer PATH
[--load CKPT | --hf-dir DIR] --save DIR"""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--counts", required=True, help="counts file from `vocab-freq` (same tokenizer)")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--keep", type=int, metavar="N",
                      help="final vocabulary size N (before Megatron's padding): special, unknown, byte-fallback and "
                           "config-named tokens count inside it, the rest is filled with the most frequent tokens "
                           "together with the pieces they are merged through")
    size.add_argument("--keep-min", type=int, metavar="N",
                      help="instead of --keep: the N most frequent tokens, with the always-kept tokens and merge "
                           "intermediates added on top (final size > N)")
    p.add_argument("--tokenizer", required=True,
                   help="the model's tokenizer: SentencePiece .model file, HF tokenizer.json, or HF tokenizer "
                        "directory (a directory holding both tokenizer.model and tokenizer.json prunes both)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--load", help="Megatron checkpoint (any TP/PP) whose embedding / output layer to slice")
    src.add_argument("--hf-dir", help="HF LLaMA checkpoint whose embed_tokens / lm_head to slice")
    p.add_argument("--save", required=True,
                   help="output directory: pruned checkpoint (or tokenizer alone), new tokenizer, vocab_map.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --save")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from megatron_prune.vocab.run import VOCAB_MAP, prune_vocab

    keep_min = args.keep is None
    res = prune_vocab(args.counts, args.keep_min if keep_min else args.keep, args.tokenizer, args.save,
                      load=args.load, hf_dir=args.hf_dir, overwrite=args.overwrite, progress=not args.no_progress,
                      keep_min=keep_min)
    s = res.stats
    cov = f", covering {100 * s['coverage']:.2f}% of the counted tokens" if s["coverage"] is not None else ""
    rule = f"top {s['keep']} plus" if keep_min else f"budget {s['keep']}:"
    skipped = f", {s['skipped_no_room']} frequent tokens skipped (their intermediates did not fit)" if (
        s["skipped_no_room"]) else ""
    print(f"wrote {args.save}: vocabulary {s['old_vocab_size']} -> {s['vocab_size']} ids ({rule} "
          f"{s['always_kept']} always kept, {s['by_frequency']} by frequency, {s['merge_closure_added']} merge "
          f"intermediates{skipped}){cov}; id map in {VOCAB_MAP}")
    if res.meta is not None:
        print(f"  Megatron tp={res.meta.tp} pp={res.meta.pp}: padded vocab {res.meta.padded_vocab_size}")
    for note in res.notes:
        print(f"note: {note}")
    return 0
