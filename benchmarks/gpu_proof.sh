#!/usr/bin/env bash
# GPU proof kit: our GPU path (CUDA/NCCL, bf16, Transformer Engine) proven in one run of a few minutes on a
# bare single-GPU machine (Python 3.12 with a CUDA torch, no package registry). README: "GPU proof kit".
#
#   make gpu-wheels                          # beforehand, where a registry is reachable -> benchmarks/gpu_wheels/
#   bash benchmarks/gpu_proof.sh             # on the GPU machine, from the repository root (checkout + wheels)
#   bash benchmarks/gpu_proof.sh --dry-run   # CPU: the wheels (when the folder exists) and every stage's arguments
#   bash benchmarks/gpu_proof.sh --help      # all options
#
# Environment: PYTHON (default python3), WHEELS (benchmarks/gpu_wheels), WORK (/tmp/gpu_proof: ~15 GB of
# scratch), OUT (benchmarks/out/gpu_proof/results.md; logs/ beside it). The logic is in benchmarks/gpu_proof.py.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export GPU_PROOF_T0="${GPU_PROOF_T0:-$(date +%s)}"   # the time budget counts from here
PY="${PYTHON:-python3}"
exec "$PY" benchmarks/gpu_proof.py run --python "$PY" --wheels "${WHEELS:-benchmarks/gpu_wheels}" \
    --work "${WORK:-/tmp/gpu_proof}" --out "${OUT:-benchmarks/out/gpu_proof/results.md}" "$@"
