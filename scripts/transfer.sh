#!/usr/bin/env bash
# The former name of scripts/reshard.sh (change the TP/PP size of a Megatron checkpoint), kept for scripts that call
# it: same flags, same variables. See `bash scripts/reshard.sh --help`.
set -euo pipefail
exec bash "$(dirname -- "${BASH_SOURCE[0]}")/reshard.sh" "$@"
