#!/usr/bin/env bash
# Prune a TP-sharded (PP=1) Megatron LLaMA checkpoint: one process per TP rank under torchrun.
# Writes pruned shards plus SAVE/prune_plan.json (re-apply with --plan / PLAN, or to HF with `prune-hf`).
#
# Flag / Environment variable (a flag wins over its variable; an empty size keeps the
# source's size). Other arguments go to `python -m megatron_prune prune` (options below), e.g. --overwrite.
#   --load                        LOAD                        input Megatron checkpoint            [required]
#   --save                        SAVE                        output directory (must not exist or be empty) [required]
#   --tp                          TP                          processes = the checkpoint's TP size
#                                                             [read from the --load checkpoint]
#   --hidden-size-remain          HIDDEN_SIZE_REMAIN          hidden channels to keep                []
#   --num-attention-heads-remain  NUM_ATTENTION_HEADS_REMAIN  query heads to keep                    []
#   --num-query-groups-remain     NUM_QUERY_GROUPS_REMAIN     query groups (KV heads) to keep
#                                                             [MHA stays MHA; GQA keeps its groups]
#   --ffn-hidden-size-remain      FFN_HIDDEN_SIZE_REMAIN      FFN channels to keep                   []
#   --num-layers-remain           NUM_LAYERS_REMAIN           layers to keep, by Block Influence (activation|taylor) []
#   --drop-layers                 DROP_LAYERS                 layer ids to drop, 0-based, e.g. 7,13,18,24  []
#   --prune-type                  PRUNE_TYPE                  balance (equal shards) | global (uneven)  [balance]
#   --importance                  IMPORTANCE                  random | magnitude | activation | taylor  [activation]
#                                                             (taylor: |weight x gradient| per unit, backward passes)
#   --calib-data                  CALIB_DATA                  text/jsonl file or indexed dataset prefix
#                                                                                    [the shipped English sample]
#   --calib-samples               CALIB_SAMPLES               calibration sequences                  [64]
#   --seed                        SEED                        random plan seed                       [1234]
#   --plan                        PLAN                        re-apply this prune_plan.json instead of making a plan
#   --ckpt-format                 CKPT_FORMAT                 output: torch (legacy rank files) | torch_dist [torch]
# A budget instead of sizes (searches layers, hidden, heads per group and FFN):
#   --target-params               TARGET_PARAMS               parameters to keep: 64047840, 6.4e7 or 50%   []
#   --target-memory-gb            TARGET_MEMORY_GB            GiB (2^30 bytes) of bf16 weights + KV cache  []
#   --memory-seq-length           MEMORY_SEQ_LENGTH           KV cache tokens per sequence  [max_position_embeddings]
#   --memory-batch-size           MEMORY_BATCH_SIZE           KV cache sequences                     [1]
#   --width-multiple              WIDTH_MULTIPLE              hidden / FFN widths are multiples of this [128]
#   --max-depth-drop              MAX_DEPTH_DROP              at most this fraction of layers dropped [0.5]
#   --max-width-drop              MAX_WIDTH_DROP              at most this fraction of each width removed [0.5]
#   --search-candidates           SEARCH_CANDIDATES           shapes evaluated by loss (the importance proxy's best) [8]
#   --[no-]megatron-only-shapes   MEGATRON_ONLY_SHAPES=1|0    also shapes transformers >= 5 cannot load
#                                                             (hidden % heads != 0; megatron-core runs them) [0]
#   --[no-]dry-run                DRY_RUN=1|0                 list the candidates and stop: one process, no
#                                                             torchrun, nothing written (--save not needed) [0]
#                                 OMP_NUM_THREADS             CPU threads per process                [1]
#                                 PYTHON                      Python interpreter [the repository's .venv, else python3]
#
# After `make demo` (SmolLM2-135M at TP=3: the demo's own shape, 30 -> 20 layers, about a minute on 2 cores):
#   bash scripts/prune_llama.sh --load demo_out/compress/stages/01-convert/ckpt --save demo_out/pruned-again --hidden-size-remain 480 \
#     --num-attention-heads-remain 6 --ffn-hidden-size-remain 1020 --num-layers-remain 20
# LLaMA-2-7B -> 3.4B:
#   bash scripts/prune_llama.sh --load ckpt/llama2-7b-tp8 --save ckpt/pruned --hidden-size-remain 3072 \
#     --num-attention-heads-remain 24 --ffn-hidden-size-remain 8192 --drop-layers 7,13,18,24
# or the same with variables:
#   LOAD=ckpt/llama2-7b-tp8 SAVE=ckpt/pruned TP=8 HIDDEN_SIZE_REMAIN=3072 NUM_ATTENTION_HEADS_REMAIN=24 \
#   FFN_HIDDEN_SIZE_REMAIN=8192 DROP_LAYERS=7,13,18,24 bash scripts/prune_llama.sh
# The shapes of half the parameters that also fit 8 GiB with a 4096-token KV cache:
#   bash scripts/prune_llama.sh --load ckpt/llama2-7b-tp8 --target-params 50% --target-memory-gb 8 \
#     --memory-seq-length 4096 --dry-run      (or LOAD=... TARGET_PARAMS=50% ... DRY_RUN=1 bash scripts/prune_llama.sh)
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/lib/env.sh"
mp_help "$0" "-m megatron_prune prune" "$@"
mp_flag --load LOAD
mp_flag --save SAVE
mp_flag --tp TP
mp_flag --hidden-size-remain HIDDEN_SIZE_REMAIN
mp_flag --num-attention-heads-remain NUM_ATTENTION_HEADS_REMAIN
mp_flag --num-query-groups-remain NUM_QUERY_GROUPS_REMAIN
mp_flag --ffn-hidden-size-remain FFN_HIDDEN_SIZE_REMAIN
mp_flag --num-layers-remain NUM_LAYERS_REMAIN
mp_flag --drop-layers DROP_LAYERS
mp_flag --prune-type PRUNE_TYPE
mp_flag --importance IMPORTANCE
mp_flag --ckpt-format CKPT_FORMAT
mp_flag --calib-data CALIB_DATA
mp_flag --calib-samples CALIB_SAMPLES
mp_flag --seed SEED
mp_flag --plan PLAN
mp_flag --target-params TARGET_PARAMS
mp_flag --target-memory-gb TARGET_MEMORY_GB
mp_flag --memory-seq-length MEMORY_SEQ_LENGTH
mp_flag --memory-batch-size MEMORY_BATCH_SIZE
mp_flag --width-multiple WIDTH_MULTIPLE
mp_flag --max-depth-drop MAX_DEPTH_DROP
mp_flag --max-width-drop MAX_WIDTH_DROP
mp_flag --search-candidates SEARCH_CANDIDATES
mp_switch megatron-only-shapes MEGATRON_ONLY_SHAPES
mp_switch dry-run DRY_RUN
mp_vars OMP_NUM_THREADS
mp_check_env
# Every user error (a missing --load, a wrong --tp, a bad size) is found in one process before torchrun starts one
# process per TP rank of --load; --check-only and --dry-run run in that one process only.
mp_torchrun prune ${MP_FLAGS[@]+"${MP_FLAGS[@]}"} "$@"
