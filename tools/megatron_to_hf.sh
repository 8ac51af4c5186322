#!/usr/bin/env bash
# Megatron shards (any TP/PP, even or uneven) -> HF LLaMA directory that transformers, lm-eval-harness and
# vLLM can read.
#
# Flag / Environment variable (a flag wins over its variable). Other arguments are passed
# to the exporter (see the options below).
#   --load   LOAD    Megatron checkpoint directory                               [required]
#   --save   SAVE    output HF directory                                         [required]
#   --dtype  DTYPE   bf16 | fp16 | fp32                                          [the checkpoint's dtype]
#            PYTHON  Python interpreter                  [the repository's .venv, else python3]
#
# Examples: bash tools/megatron_to_hf.sh --load ckpt/pruned --save hf/pruned --dtype bf16
#           LOAD=ckpt/pruned SAVE=hf/pruned DTYPE=bf16 bash tools/megatron_to_hf.sh
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/../scripts/lib/env.sh"
mp_help "$0" "-m megatron_prune convert megatron-to-hf" "$@"
mp_flag --load LOAD
mp_flag --save SAVE
mp_flag --dtype DTYPE
mp_check_env
exec "$PYTHON" -m megatron_prune convert megatron-to-hf ${MP_FLAGS[@]+"${MP_FLAGS[@]}"} "$@"
