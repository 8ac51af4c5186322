#!/usr/bin/env bash
# README's main job: a real small LLaMA (SmolLM2-135M, from a PyPI package) converted to Megatron TP shards,
# evaluated in megatron-core under torchrun beside HF transformers, and exported back bit-exactly.
#
# Environment (defaults in brackets); extra arguments go to `python -m megatron_prune.demo`:
#   OUT     working directory              [demo_out]
#   PYTHON  Python interpreter             [python3]
#
# Example: bash scripts/demo.sh --quick
set -euo pipefail
PYTHON=${PYTHON:-python3}
if [[ " $* " == *" --help "* || " $* " == *" -h "* ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exec "$PYTHON" -m megatron_prune.demo --help
fi
exec "$PYTHON" -m megatron_prune.demo --out "${OUT:-demo_out}" "$@"
