# shellcheck shell=bash
# Sourced by every shell entry point in tools/ and scripts/ (never run on its own). It gives them:
#   PYTHON    the repository's .venv/bin/python when it exists and PYTHON is unset (so `make demo` / `make test`
#             installs are found from a shell where the venv is not activated), else python3. PYTHONPATH gets the
#             repository root first, so a script runs the code of the checkout it lives in.
#   MP_FLAGS  command-line flags made from environment variables (mp_flag, mp_list, mp_switch). A script places
#             them BEFORE the user's arguments: argparse keeps the last value of a flag, so a flag given on the
#             command line wins over its variable. Required inputs are checked once, by the Python CLI. Scripts
#             expand it as ${MP_FLAGS[@]+"${MP_FLAGS[@]}"}: bash < 4.4 calls an empty array unbound under set -u.
#   mp_help   `--help`: the script's header comment, then the CLI's own help.

MP_ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/../.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$MP_ROOT/.venv/bin/python" ]]; then PYTHON=$MP_ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$MP_ROOT${PYTHONPATH:+:$PYTHONPATH}"
MP_FLAGS=()
# The Python CLI names a missing required flag together with the variable that sets it ("--save (SAVE)").
export MEGATRON_PRUNE_ENV_FLAGS=""

# mp_flag FLAG VAR: `FLAG "$VAR"` when the variable VAR is set and non-empty; otherwise the CLI's default holds.
mp_flag() {
  MEGATRON_PRUNE_ENV_FLAGS+="$1=$2 "
  if [[ -n "${!2:-}" ]]; then MP_FLAGS+=("$1" "${!2}"); fi
}

# mp_list FLAG VAR: a space-separated variable as one multi-value flag (INPUT='a.jsonl b.jsonl' -> --input a b).
# Words are not glob-expanded here: the CLI expands quoted globs itself.
mp_list() {
  MEGATRON_PRUNE_ENV_FLAGS+="$1=$2 "
  local words
  read -r -a words <<< "${!2:-}"
  if (( ${#words[@]} )); then MP_FLAGS+=("$1" "${words[@]}"); fi
}

# mp_switch NAME VAR [DEFAULT]: VAR=1 -> --NAME, VAR=0 -> --no-NAME (the CLI takes both, so a later flag still
# wins), unset -> DEFAULT (or nothing).
mp_switch() {
  local value=${!2:-${3:-}}
  case "$value" in
    1) MP_FLAGS+=("--$1") ;;
    0) MP_FLAGS+=("--no-$1") ;;
    "") ;;
    *) echo "error: $2 must be 0 or 1, got '$value'" >&2; exit 2 ;;
  esac
}

# mp_last FLAG ARGS...: print the last value given for FLAG in ARGS (`FLAG V` or `FLAG=V`); nothing if absent.
mp_last() {
  local flag=$1 value="" prev=""
  shift
  for arg in "$@"; do
    if [[ "$prev" == "$flag" ]]; then value=$arg; fi
    if [[ "$arg" == "$flag="* ]]; then value=${arg#"$flag="}; fi
    prev=$arg
  done
  printf '%s' "$value"
}

# mp_help SCRIPT "PYTHON ARGS" ARGS...: if ARGS ask for help (-h / --help), print SCRIPT's header comment (line 2
# up to `set -euo pipefail`) and exec `$PYTHON PYTHON ARGS --help`; otherwise return.
mp_help() {
  local script=$1 cli arg
  read -r -a cli <<< "$2"
  shift 2
  for arg in "$@"; do
    if [[ "$arg" == --help || "$arg" == -h ]]; then
      sed -n '2,/^set -euo/p' "$script" | sed '$d' | sed 's/^# \{0,1\}//'
      exec "$PYTHON" "${cli[@]}" --help
    fi
  done
}

# mp_on NAME ARGS...: print 1 if the last of --NAME / --no-NAME in ARGS is --NAME, else 0 (a switch the script
# itself acts on, such as prune_llama.sh's --dry-run, set by mp_switch or on the command line).
mp_on() {
  local name=$1 value=0
  shift
  for arg in "$@"; do
    if [[ "$arg" == "--$name" ]]; then value=1; elif [[ "$arg" == "--no-$name" ]]; then value=0; fi
  done
  printf '%s' "$value"
}
