#!/usr/bin/env bash
# Change the tensor-parallel (and pipeline-parallel) size of a Megatron checkpoint: converted, pruned (even or
# uneven `global`-mode shards) or trained. Bit-exact; one output rank at a time; optimizer state is not carried.
#
# Environment (defaults in brackets); extra arguments are passed to `python -m megatron_prune reshard`:
#   LOAD    source checkpoint directory      [required]
#   SAVE    output checkpoint directory      [required]
#   TP      target tensor-parallel size      [1]
#   PP      target pipeline-parallel size    [1]
#   PYTHON  Python interpreter               [python3]
#
# Example: LOAD=ckpt/pruned-global SAVE=ckpt/pruned-tp2 TP=2 bash scripts/transfer.sh
set -euo pipefail
PYTHON=${PYTHON:-python3}
if [[ " $* " == *" --help "* || " $* " == *" -h "* ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exec "$PYTHON" -m megatron_prune reshard --help
fi
: "${LOAD:?set LOAD to the source checkpoint (see --help)}"
: "${SAVE:?set SAVE to the output directory (see --help)}"
exec "$PYTHON" -m megatron_prune reshard --load "$LOAD" --save "$SAVE" --tp "${TP:-1}" --pp "${PP:-1}" "$@"
