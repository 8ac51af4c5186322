#!/usr/bin/env bash
# Prune a TP-sharded (PP=1) Megatron LLaMA checkpoint: one process per TP rank under torchrun.
# Writes pruned shards plus SAVE/prune_plan.json (re-apply with PLAN=..., or to HF with `prune-hf`).
#
# Environment (defaults in brackets; an empty size keeps the source's size):
#   LOAD                        input Megatron checkpoint (required)
#   SAVE                        output directory (required; must not exist or be empty)
#   TP                          processes = the checkpoint's TP size   [read from LOAD/megatron_prune.json]
#   HIDDEN_SIZE_REMAIN          hidden channels to keep                []
#   NUM_ATTENTION_HEADS_REMAIN  query heads to keep                    []
#   NUM_QUERY_GROUPS_REMAIN     query groups (KV heads) to keep        [MHA stays MHA; GQA keeps its groups]
#   FFN_HIDDEN_SIZE_REMAIN      FFN channels to keep                   []
#   NUM_LAYERS_REMAIN           layers to keep, chosen by Block Influence (IMPORTANCE=activation)   []
#   DROP_LAYERS                 layer ids to drop, 0-based, e.g. 7,13,18,24                          []
#   PRUNE_TYPE                  balance (equal shards) | global (best over all ranks, uneven shards) [balance]
#   IMPORTANCE                  random | magnitude | activation        [random]
#   CALIB_DATA                  text/jsonl file or indexed dataset prefix [the shipped English sample]
#   CALIB_SAMPLES               calibration sequences                  [64]
#   SEED                        random plan seed                       [1234]
#   PLAN                        re-apply this prune_plan.json instead of making a plan   []
#   PYTHON                      Python interpreter                     [python3]
#
# Extra arguments go to `python -m megatron_prune prune` (see --help below), e.g. --overwrite.
# Example (the seed's 7B -> 3.4B shape):
#   LOAD=ckpt/llama2-7b-tp8 SAVE=ckpt/pruned TP=8 HIDDEN_SIZE_REMAIN=3072 NUM_ATTENTION_HEADS_REMAIN=24 \
#   FFN_HIDDEN_SIZE_REMAIN=8192 DROP_LAYERS=7,13,18,24 bash scripts/prune_llama.sh
set -euo pipefail
PYTHON=${PYTHON:-python3}
if [[ " $* " == *" --help "* || " $* " == *" -h "* ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exec "$PYTHON" -m megatron_prune prune --help
fi
: "${LOAD:?set LOAD to the input Megatron checkpoint}"
: "${SAVE:?set SAVE to the output directory}"
if [[ -z "${TP:-}" ]]; then
  TP=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1] + "/megatron_prune.json"))["tp"])' \
       "$LOAD" 2>/dev/null) || { echo "error: set TP (cannot read $LOAD/megatron_prune.json)" >&2; exit 2; }
fi

args=(--load "$LOAD" --save "$SAVE")
add() { if [[ -n "$2" ]]; then args+=("$1" "$2"); fi; }
add --hidden-size-remain "${HIDDEN_SIZE_REMAIN:-}"
add --num-attention-heads-remain "${NUM_ATTENTION_HEADS_REMAIN:-}"
add --num-query-groups-remain "${NUM_QUERY_GROUPS_REMAIN:-}"
add --ffn-hidden-size-remain "${FFN_HIDDEN_SIZE_REMAIN:-}"
add --num-layers-remain "${NUM_LAYERS_REMAIN:-}"
add --drop-layers "${DROP_LAYERS:-}"
add --prune-type "${PRUNE_TYPE:-}"
add --importance "${IMPORTANCE:-}"
add --calib-data "${CALIB_DATA:-}"
add --calib-samples "${CALIB_SAMPLES:-}"
add --seed "${SEED:-}"
add --plan "${PLAN:-}"

# Every user error is caught here, in one process, before torchrun starts TP workers.
"$PYTHON" -m megatron_prune prune "${args[@]}" --check-only "$@"
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$TP" -m megatron_prune prune "${args[@]}" "$@"
