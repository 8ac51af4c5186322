#!/usr/bin/env bash
# End to end on CPU: a real small LLaMA (SmolLM2-135M, from a PyPI package) converted to Megatron TP shards,
# evaluated in megatron-core under torchrun beside HF transformers, exported back bit-exactly, pruned to about half
# its parameters, resharded, recovered by distillation and exported to HF, with a perplexity table and loss plot.
# Without SmolLM2 (or with --model tiny) it trains a small LLaMA from the shipped text first and uses that.
#
# Flag / Environment variable (a flag wins over its variable); other arguments go to
# `python -m megatron_prune.demo` (see the options below):
#   --out  OUT     working directory              [demo_out]
#          PYTHON  Python interpreter             [the repository's .venv, else python3]
#
# Example: bash scripts/demo.sh --quick        (about 3 minutes on 2 cores; the full run about 13)
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/lib/env.sh"
mp_help "$0" "-m megatron_prune.demo" "$@"
mp_flag --out OUT
mp_check_env
exec "$PYTHON" -m megatron_prune.demo ${MP_FLAGS[@]+"${MP_FLAGS[@]}"} "$@"
