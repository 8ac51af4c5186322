"""python -m megatron_prune megatron-lm-args --load CKPT [--tokenizer PATH] [--one-line | --null]"""

from __future__ import annotations

import sys


def add_arguments(p) -> None:
    p.description = ("Print the Megatron-LM pretrain_gpt.py flags that load a Megatron checkpoint (converted, pruned, "
                     "resharded or trained by megatron_prune, or written by Megatron-LM; legacy or torch_dist) as "
                     "exactly the model it holds: shape, norm epsilon, rope, dtype, parallel sizes, transformer impl, "
                     "tokenizer, format and loading flags (for a training checkpoint: how its optimizer, scheduler and "
                     "RNG state continue). Add your run's own flags (data, batch sizes, iterations, learning rate, "
                     "--save).")
    p.add_argument("--load", required=True, help="the Megatron checkpoint directory")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer (HF directory or SentencePiece .model) if not the one inside --load")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--one-line", action="store_true",
                     help="all flags on one line, unquoted, for an unquoted $(...) (refused when a value holds "
                          "spaces or shell wildcards: $(...) would split it)")
    out.add_argument("--null", action="store_true",
                     help="every word NUL-terminated (exact for any path: xargs -0, mapfile -d '')")


def run(args) -> int:
    from megatron_prune.checkpoint import megatron_io as mio
    from megatron_prune.checkpoint.mlm_command import (format_flags, null_separated, pretrain_gpt_flags,
                                                       tokenizer_padding_problem)

    flags, notes = pretrain_gpt_flags(args.load, args.tokenizer)
    text = null_separated(flags) if args.null else format_flags(flags, one_line=args.one_line) + "\n"
    tokenizer_model = next(f[1] for f in flags if f[0] == "--tokenizer-model")
    problem = _padding_problem(mio.open_checkpoint(args.load).meta, tokenizer_model, tokenizer_padding_problem)
    sys.stdout.write(text)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if problem:
        print(f"warning: {problem}", file=sys.stderr)
    return 0


def _padding_problem(meta, tokenizer_model: str, check) -> str | None:
    """The tokenizer is loaded here (the checkpoint layer knows no tokenizers); its size is checked there."""
    from megatron_prune.data.tokenizers import TokenizerError, load_tokenizer

    try:
        tokens = load_tokenizer(tokenizer_model).vocab_size
    except TokenizerError as e:  # the flags stand; only the size check could not run
        return f"could not check the tokenizer's size against the embedding: {e}"
    return check(meta, tokens, tokenizer_model)
