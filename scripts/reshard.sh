#!/usr/bin/env bash
# Change the tensor-parallel (and pipeline-parallel) size or the format of a Megatron checkpoint: converted, pruned
# (even or uneven `global`-mode shards) or trained, legacy or torch_dist. Bit-exact; one output rank at a time;
# optimizer state is not carried.
#
# Flag / Environment variable (a flag wins over its variable). Other arguments are passed
# to `python -m megatron_prune reshard` (see the options below).
#   --load  LOAD    source checkpoint directory      [required]
#   --save  SAVE    output checkpoint directory      [required]
#   --tp    TP      target tensor-parallel size      [1]
#   --pp    PP      target pipeline-parallel size    [1]
#   --ckpt-format  CKPT_FORMAT  output format: torch (legacy rank files) | torch_dist   [torch]
#           PYTHON  Python interpreter               [the repository's .venv, else python3]
#
# Examples: bash scripts/reshard.sh --load demo_out/compress/stages/03-prune/ckpt --save demo_out/pruned-tp1-again \
#             --tp 1   (after `make demo`)
#           LOAD=ckpt/pruned-global SAVE=ckpt/pruned-tp2 TP=2 bash scripts/reshard.sh
# (scripts/transfer.sh is the same script under its former name.)
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/lib/env.sh"
mp_help "$0" "-m megatron_prune reshard" "$@"
mp_flag --load LOAD
mp_flag --save SAVE
TP=${TP:-1}  # this script's default; `reshard` itself requires --tp
mp_flag --tp TP
mp_flag --pp PP
mp_flag --ckpt-format CKPT_FORMAT
mp_check_env
exec "$PYTHON" -m megatron_prune reshard ${MP_FLAGS[@]+"${MP_FLAGS[@]}"} "$@"
