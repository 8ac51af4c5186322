#!/usr/bin/env bash
# Run a command (default: an interactive shell) in the GPU image on one node, with the settings NCCL and
# PyTorch dataloaders need: all GPUs, host IPC, a large /dev/shm, unlimited locked memory.
#
# Environment (defaults in brackets); the arguments are the command to run inside the container:
#   IMAGE     image name                                   [megatron_prune:latest]
#   DATA_DIR  host directory mounted at /data              [$PWD/data]
#   CKPT_DIR  host directory mounted at /ckpt              [$PWD/checkpoints]
#   SHM_SIZE  shared memory size                           [64g]
#
# Example: bash docker/run.sh torchrun --nproc-per-node 8 -m megatron_prune train --config /ckpt/train.yaml
set -euo pipefail
if [[ " $* " == *" --help "* ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0
fi
DATA_DIR=${DATA_DIR:-$PWD/data}
CKPT_DIR=${CKPT_DIR:-$PWD/checkpoints}
mkdir -p "$DATA_DIR" "$CKPT_DIR"
tty=(); [[ -t 0 ]] && tty=(-it)
exec docker run --rm "${tty[@]}" --gpus all --ipc=host --shm-size "${SHM_SIZE:-64g}" \
  --ulimit memlock=-1 --ulimit stack=67108864 \
  -v "$DATA_DIR:/data" -v "$CKPT_DIR:/ckpt" \
  "${IMAGE:-megatron_prune:latest}" "${@:-bash}"
