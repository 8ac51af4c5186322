#!/usr/bin/env bash
# Build the GPU image from the repository root.
#
# Environment (defaults in brackets); extra arguments go to `docker build`:
#   IMAGE    image name                          [megatron_prune:latest]
#   NGC_TAG  nvcr.io/nvidia/pytorch tag          [25.04-py3]
set -euo pipefail
if [[ " $* " == *" --help "* || " $* " == *" -h "* ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0
fi
cd "$(dirname "$0")/.."
exec docker build --build-arg "NGC_TAG=${NGC_TAG:-25.04-py3}" -t "${IMAGE:-megatron_prune:latest}" -f Dockerfile "$@" .
