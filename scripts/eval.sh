#!/usr/bin/env bash
# Mean next-token loss and perplexity of a Megatron checkpoint over a text file, in megatron-core under torchrun:
# one process per TP x PP rank of the checkpoint (NPROC: a multiple of it; the extra data-parallel ranks split the
# text). The arguments are checked in one process before torchrun starts, and a failure is one line.
#
# Flag / Environment variable (a flag wins over its variable). Other arguments go to
# `python -m megatron_prune eval` (options below), e.g. --json.
#   --load              LOAD              Megatron checkpoint directory                                  [required]
#   --text-file         TEXT_FILE         UTF-8 text (.txt, or .jsonl with 'text' fields)                [required]
#   --tokenizer         TOKENIZER         HF tokenizer directory or SentencePiece .model  [the checkpoint's files]
#   --seq-length        SEQ_LENGTH        tokens per window                                              [512]
#   --max-tokens        MAX_TOKENS        evaluate at most this many tokens                             [all]
#   --micro-batch-size  MICRO_BATCH_SIZE  windows per forward pass                                       [4]
#                       NPROC             processes (a multiple of the checkpoint's tp x pp)    [tp x pp]
#                       OMP_NUM_THREADS   CPU threads per process                                        [1]
#                       PYTHON            Python interpreter        [the repository's .venv, else python3]
#
# Example (after `make demo`; the shipped held-out text, about 30 s on 2 cores):
#   bash scripts/eval.sh --load demo_out/compress/stages/01-convert/ckpt --text-file megatron_prune/data/samples/heldout.jsonl \
#     --max-tokens 8192
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/lib/env.sh"
mp_help "$0" "-m megatron_prune eval" "$@"
mp_flag --load LOAD
mp_flag --text-file TEXT_FILE
mp_flag --tokenizer TOKENIZER
mp_flag --seq-length SEQ_LENGTH
mp_flag --max-tokens MAX_TOKENS
mp_flag --micro-batch-size MICRO_BATCH_SIZE
mp_vars NPROC OMP_NUM_THREADS
mp_check_env
MP_LAUNCH=(--standalone --nproc "${NPROC:-}" --nproc-name NPROC)
mp_torchrun eval ${MP_FLAGS[@]+"${MP_FLAGS[@]}"} "$@"
