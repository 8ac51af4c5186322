#!/usr/bin/env bash
# HF LLaMA directory -> Megatron TP/PP shards (Megatron-LM legacy `torch` layout, or `torch_dist`).
#
# Flag / Environment variable (a flag wins over its variable). Other arguments are passed
# to the converter (see the options below).
#   --hf-dir  HF_DIR        HF model directory with config.json and *.safetensors / pytorch_model*.bin  [required]
#   --save    SAVE          output checkpoint directory                                               [required]
#   --tp      TP            tensor-parallel size                                                       [1]
#   --pp      PP            pipeline-parallel size                                                     [1]
#   --dtype   DTYPE         bf16 | fp16 | fp32                                          [the HF config's dtype]
#   --make-vocab-size-divisible-by  DIVISIBLE_BY   pad the vocabulary to a multiple of this x TP          [128]
#   --ckpt-format CKPT_FORMAT   torch (legacy rank files) | torch_dist (megatron-core dist checkpoint)   [torch]
#             PYTHON        Python interpreter                       [the repository's .venv, else python3]
#
# Examples: bash tools/hf_to_megatron.sh --hf-dir llama-2-7b --save ckpt/llama2-tp2 --tp 2 --te-names
#           HF_DIR=llama-2-7b SAVE=ckpt/llama2-tp2 TP=2 bash tools/hf_to_megatron.sh --te-names
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/../scripts/lib/env.sh"
mp_help "$0" "-m megatron_prune convert hf-to-megatron" "$@"
mp_flag --hf-dir HF_DIR
mp_flag --save SAVE
mp_flag --tp TP
mp_flag --pp PP
mp_flag --dtype DTYPE
mp_flag --make-vocab-size-divisible-by DIVISIBLE_BY
mp_flag --ckpt-format CKPT_FORMAT
mp_check_env
exec "$PYTHON" -m megatron_prune convert hf-to-megatron ${MP_FLAGS[@]+"${MP_FLAGS[@]}"} "$@"
