#!/usr/bin/env bash
# Recovery training (or distillation) of a converted / pruned Megatron checkpoint with megatron-core:
# one torchrun call of `python -m megatron_prune train`. All arguments are passed through (options below). They are
# checked in one process before torchrun starts (a missing --train-iters, data file or checkpoint is one line).
#
# Environment (defaults in brackets):
#   PYTHON           Python interpreter                 [the repository's .venv, else python3]
#   NPROC            processes per node (tp x pp x dp / NNODES)
#                    [the node's GPUs with CUDA; else tp x pp (one data-parallel rank)]
#   NNODES           number of nodes                                      [1]
#   NODE_RANK        rank of this node (static rendezvous)                [0]
#   MASTER_ADDR      rendezvous host (multi-node)                         [127.0.0.1]
#   MASTER_PORT      rendezvous port (multi-node)                         [29500]
#   RDZV_ID          rendezvous id; set it to use c10d elastic rendezvous instead of NODE_RANK   [unset]
#   OMP_NUM_THREADS  CPU threads per process                              [1]
#   DRY_RUN          1: check the arguments, print the torchrun command instead of running it  [0]
#   CKPT_FORMAT      --ckpt-format of the training checkpoints: torch | torch_dist (a flag wins)   [torch]
#
# After `make demo` (CPU: 2 iterations of the pruned model, its TP read from the checkpoint):
#   bash scripts/train_recovery.sh --load demo_out/compress/stages/04-reshard/student --save demo_out/recovered-again \
#     --data-path demo_out/compress/stages/02-preprocess/train_text_document --train-iters 2
# Single node, TP=2 (NPROC: 2 on CPU, all GPUs of the node with CUDA):
#   bash scripts/train_recovery.sh --load ckpt/pruned --save ckpt/recovered --tp 2 \
#     --data-path data/corpus_text_document --micro-batch-size 4 --global-batch-size 64 --seq-length 2048 \
#     --train-iters 1000 --lr 1e-4 --min-lr 1e-5 --lr-warmup-iters 50 --save-interval 200 --eval-interval 100
# Distillation from the unpruned model:   ... --teacher-load ckpt/original --kd-alpha 0.5 --kd-temperature 1
# Settings from a file (command line wins): ... --config recovery.yaml
# Two nodes (run on each, NODE_RANK=0 and 1):  NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NPROC=8 bash ...
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/lib/env.sh"
mp_help "$0" "-m megatron_prune train" "$@"
mp_flag --ckpt-format CKPT_FORMAT
mp_vars NPROC NNODES NODE_RANK MASTER_ADDR MASTER_PORT RDZV_ID OMP_NUM_THREADS DRY_RUN
mp_check_env
NNODES=${NNODES:-1}
if [[ -n "${RDZV_ID:-}" ]]; then
  MP_LAUNCH=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-id "$RDZV_ID"
             --rdzv-endpoint "${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}")
elif [[ "$NNODES" == 1 && -z "${MASTER_ADDR:-}" ]]; then
  MP_LAUNCH=(--standalone)
else
  MP_LAUNCH=(--nnodes "$NNODES" --node-rank "${NODE_RANK:-0}" --master-addr "${MASTER_ADDR:-127.0.0.1}"
             --master-port "${MASTER_PORT:-29500}")
fi
MP_LAUNCH+=(--nproc "${NPROC:-}" --nproc-name NPROC)
case "${DRY_RUN:-0}" in
  1) MP_LAUNCH+=(--print) ;;
  0) ;;
  *) echo "error: DRY_RUN must be 0 or 1, got '$DRY_RUN'" >&2; exit 2 ;;
esac
mp_torchrun train ${MP_FLAGS[@]+"${MP_FLAGS[@]}"} "$@"
