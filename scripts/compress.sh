#!/usr/bin/env bash
# One resumable job from an HF LLaMA model to a smaller, recovered HF model: convert (TP) -> prune to the budget ->
# reshard to the training TP -> distillation from the unpruned model -> export to HF -> held-out evaluation of the
# original, pruned and recovered models. Stage outputs in SAVE/stages/NN-name/; the final model in SAVE/hf; the
# numbers in SAVE/report.json and SAVE/report.md; the resolved settings in SAVE/recipe.yaml (rerun with
# --config SAVE/recipe.yaml). Running the same command again continues from the first stage not done.
#
# Flag / Environment variable (a flag wins over its variable):
#   --hf-dir             HF_DIR             HF LLaMA directory with its tokenizer        [required]
#   --save               SAVE               job directory                                [required]
#   --target-params      TARGET_PARAMS      parameters to keep: 6.4e7 or 50%             []
#   --target-memory-gb   TARGET_MEMORY_GB   GiB of bf16 weights + KV cache               []
#   --tp                 TP                 TP size of conversion and pruning            [1]
#   --train-tp           TRAIN_TP           TP size of training and evaluation           [--tp]
#   --calib-data         CALIB_DATA         pruner calibration text / prefix             [the shipped English sample]
#   --train-data         TRAIN_DATA         training text files or indexed prefixes (space-separated) [required]
#   --eval-data          EVAL_DATA          held-out text for the three evaluations      [required]
#   --train-iters        TRAIN_ITERS        training iterations in all                   [required]
#   --seq-length         SEQ_LENGTH         tokens per sequence                          [required]
#   --global-batch-size  GLOBAL_BATCH_SIZE  sequences per iteration                      [required]
#   --micro-batch-size   MICRO_BATCH_SIZE   sequences per micro-batch per rank           [train's default]
#   --steps              STEPS              prune/recover rounds                         [1]
#   --nproc              NPROC              training processes per node                  [the node's GPUs, else TRAIN_TP]
#   --eval-max-tokens    EVAL_MAX_TOKENS    held-out tokens evaluated at most            [all]
#   --config             CONFIG             YAML / JSON recipe of these settings         []
#   --convert-args ... --eval-args  CONVERT_ARGS PREPROCESS_ARGS PRUNE_ARGS RESHARD_ARGS TRAIN_ARGS EXPORT_ARGS EVAL_ARGS
#                                           more options of one stage, one quoted string []
#                        OMP_NUM_THREADS    CPU threads per process                      [1]
#                        PYTHON             Python interpreter [the repository's .venv, else python3]
# Example (SmolLM2-135M in HF format at ckpt/smollm2, half its parameters, 60 iterations on the shipped text):
#   bash scripts/compress.sh --hf-dir ckpt/smollm2 --save runs/smol-half --target-params 50% --tp 3 \
#     --train-data megatron_prune/data/samples/train.jsonl --eval-data megatron_prune/data/samples/heldout.jsonl \
#     --train-iters 60 --seq-length 128 --global-batch-size 8 --prune-args "--width-multiple 1"
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/lib/env.sh"
mp_help "$0" "-m megatron_prune compress" "$@"
mp_flag --hf-dir HF_DIR
mp_flag --save SAVE
mp_flag --target-params TARGET_PARAMS
mp_flag --target-memory-gb TARGET_MEMORY_GB
mp_flag --tp TP
mp_flag --train-tp TRAIN_TP
mp_flag --calib-data CALIB_DATA
mp_list --train-data TRAIN_DATA
mp_flag --eval-data EVAL_DATA
mp_flag --train-iters TRAIN_ITERS
mp_flag --seq-length SEQ_LENGTH
mp_flag --global-batch-size GLOBAL_BATCH_SIZE
mp_flag --micro-batch-size MICRO_BATCH_SIZE
mp_flag --steps STEPS
mp_flag --nproc NPROC
mp_flag --eval-max-tokens EVAL_MAX_TOKENS
mp_flag --config CONFIG
mp_flag --convert-args CONVERT_ARGS
mp_flag --preprocess-args PREPROCESS_ARGS
mp_flag --prune-args PRUNE_ARGS
mp_flag --reshard-args RESHARD_ARGS
mp_flag --train-args TRAIN_ARGS
mp_flag --export-args EXPORT_ARGS
mp_flag --eval-args EVAL_ARGS
mp_vars OMP_NUM_THREADS
mp_check_env
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PYTHON" -m megatron_prune compress ${MP_FLAGS[@]+"${MP_FLAGS[@]}"} "$@"
