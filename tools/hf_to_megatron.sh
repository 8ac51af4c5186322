#!/usr/bin/env bash
# HF LLaMA directory -> Megatron TP/PP shards (Megatron-LM legacy `torch` layout).
#
# Environment (defaults in brackets); extra arguments are passed to the converter:
#   HF_DIR        HF model directory with config.json and *.safetensors / pytorch_model*.bin   [required]
#   SAVE          output checkpoint directory                                                [required]
#   TP            tensor-parallel size                                                        [1]
#   PP            pipeline-parallel size                                                      [1]
#   DTYPE         bf16 | fp16 | fp32                                                          [the HF config's dtype]
#   DIVISIBLE_BY  pad the vocabulary to a multiple of DIVISIBLE_BY x TP                       [128]
#   PYTHON        Python interpreter                                                          [python3]
#
# Example: HF_DIR=llama-2-7b SAVE=ckpt/llama2-tp2 TP=2 bash tools/hf_to_megatron.sh --te-names
set -euo pipefail
PYTHON=${PYTHON:-python3}
if [[ " $* " == *" --help "* || " $* " == *" -h "* ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exec "$PYTHON" -m megatron_prune convert hf-to-megatron --help
fi
: "${HF_DIR:?set HF_DIR to the HF model directory (see --help)}"
: "${SAVE:?set SAVE to the output directory (see --help)}"
args=(--hf-dir "$HF_DIR" --save "$SAVE" --tp "${TP:-1}" --pp "${PP:-1}"
      --make-vocab-size-divisible-by "${DIVISIBLE_BY:-128}")
[[ -n "${DTYPE:-}" ]] && args+=(--dtype "$DTYPE")
exec "$PYTHON" -m megatron_prune convert hf-to-megatron "${args[@]}" "$@"
