"""python -m megatron_prune megatron-lm-args --load CKPT [--tokenizer PATH] [--one-line]"""

from __future__ import annotations

import sys


def add_arguments(p) -> None:
    p.description = ("Print the Megatron-LM pretrain_gpt.py flags that load a checkpoint written by megatron_prune "
                     "(converted, pruned, resharded or trained) as exactly the model it holds: shape, norm "
                     "epsilon, rope, dtype, parallel sizes, transformer impl, tokenizer and loading flags. Add "
                     "your run's own flags (data, batch sizes, iterations, learning rate, --save).")
    p.add_argument("--load", required=True, help="the Megatron checkpoint directory")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer (HF directory or SentencePiece .model) if not the one inside --load")
    p.add_argument("--one-line", action="store_true",
                   help="all flags on one line (default: one per line, with continuation backslashes)")


def run(args) -> int:
    from megatron_prune.checkpoint.mlm_command import format_flags, pretrain_gpt_flags, tokenizer_padding_problem

    from megatron_prune.data.tokenizers import TokenizerError

    flags = pretrain_gpt_flags(args.load, args.tokenizer)
    print(format_flags(flags, one_line=args.one_line))
    tokenizer_model = next(f[1] for f in flags if f[0] == "--tokenizer-model")
    try:
        problem = tokenizer_padding_problem(args.load, tokenizer_model)
    except TokenizerError as e:  # the flags stand; only the size check could not run
        problem = f"could not check the tokenizer's size against the embedding: {e}"
    if problem:
        print(f"warning: {problem}", file=sys.stderr)
    return 0
