#!/usr/bin/env bash
# Megatron shards (any TP/PP, even or uneven) -> HF LLaMA directory that transformers, lm-eval-harness and
# vLLM can read.
#
# Environment (defaults in brackets); extra arguments are passed to the exporter:
#   LOAD    Megatron checkpoint directory                 [required]
#   SAVE    output HF directory                           [required]
#   DTYPE   bf16 | fp16 | fp32                            [the checkpoint's dtype]
#   PYTHON  Python interpreter                            [python3]
#
# Example: LOAD=ckpt/pruned SAVE=hf/pruned DTYPE=bf16 bash tools/megatron_to_hf.sh
set -euo pipefail
PYTHON=${PYTHON:-python3}
if [[ " $* " == *" --help "* || " $* " == *" -h "* ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exec "$PYTHON" -m megatron_prune convert megatron-to-hf --help
fi
: "${LOAD:?set LOAD to the Megatron checkpoint directory (see --help)}"
: "${SAVE:?set SAVE to the output directory (see --help)}"
args=(--load "$LOAD" --save "$SAVE")
[[ -n "${DTYPE:-}" ]] && args+=(--dtype "$DTYPE")
exec "$PYTHON" -m megatron_prune convert megatron-to-hf "${args[@]}" "$@"
