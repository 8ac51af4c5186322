#!/usr/bin/env bash
# README's main job: a real small LLaMA (SmolLM2-135M, from a PyPI package) converted to Megatron TP shards,
# evaluated in megatron-core under torchrun beside HF transformers, exported back bit-exactly, pruned to about half
# its parameters, resharded, recovered by distillation and exported to HF, with a perplexity table and loss plot.
# Without SmolLM2 (or with --model tiny) it trains a small LLaMA from the shipped text first and uses that.
#
# Environment (defaults in brackets); extra arguments go to `python -m megatron_prune.demo`:
#   OUT     working directory              [demo_out]
#   PYTHON  Python interpreter             [python3]
#
# Example: bash scripts/demo.sh --quick        (4-6 minutes on 2 cores; the full run about 13)
set -euo pipefail
PYTHON=${PYTHON:-python3}
if [[ " $* " == *" --help "* || " $* " == *" -h "* ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exec "$PYTHON" -m megatron_prune.demo --help
fi
exec "$PYTHON" -m megatron_prune.demo --out "${OUT:-demo_out}" "$@"
