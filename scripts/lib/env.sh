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
#   mp_check_env  after the declarations: this Python has the dependencies, and no variable meant for the script
#             is misspelt (HIDEN_SIZE_REMAIN): each is one line and exit 2 (megatron_prune/cli/env_check.py).
#   mp_torchrun   run a torchrun subcommand: every argument checked in one process first (cli/prelaunch.py).
# Every variable a script reads is declared: by mp_flag / mp_list / mp_switch, or by mp_vars.

MP_ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/../.." && pwd)
if [[ -n "${PYTHON:-}" ]]; then
  MP_PYTHON_FROM=user
elif [[ -x "$MP_ROOT/.venv/bin/python" ]]; then
  PYTHON=$MP_ROOT/.venv/bin/python MP_PYTHON_FROM=venv
else
  PYTHON=python3 MP_PYTHON_FROM=system
fi
export PYTHONPATH="$MP_ROOT${PYTHONPATH:+:$PYTHONPATH}"
MP_FLAGS=()
MP_DECLARED=(PYTHON PYTHONPATH)
# The Python CLI names a missing required flag together with the variable that sets it ("--save (SAVE)").
export MEGATRON_PRUNE_ENV_FLAGS=""

# mp_vars VAR...: declare variables the script reads itself (not through mp_flag / mp_list / mp_switch).
mp_vars() {
  MP_DECLARED+=("$@")
}

# mp_check_env: call after the declarations (and after mp_help, so --help works in any Python).
mp_check_env() {
  local script
  script="$(basename -- "$(dirname -- "$0")")/$(basename -- "$0")"
  "$PYTHON" -m megatron_prune.cli.env_check "$MP_PYTHON_FROM" "$script" "${MP_DECLARED[@]}" || exit $?
}

# mp_torchrun SUBCOMMAND ARGS...: `python -m megatron_prune SUBCOMMAND ARGS` under torchrun, through
# cli/prelaunch.py: the arguments are checked in this one process (a bad flag, size, path or process count is one
# line before any worker starts), then torchrun starts through cli/launch.py with the processes the check gives.
# The script sets MP_LAUNCH beforehand: prelaunch options (--nproc N --nproc-name VAR, --print) and torchrun's
# rendezvous options (default --standalone).
MP_LAUNCH=()
mp_torchrun() {
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  if (( ! ${#MP_LAUNCH[@]} )); then MP_LAUNCH=(--standalone); fi
  exec "$PYTHON" -m megatron_prune.cli.prelaunch "${MP_LAUNCH[@]}" -- "$@"
}

# mp_flag FLAG VAR: `FLAG "$VAR"` when the variable VAR is set and non-empty; otherwise the CLI's default holds.
mp_flag() {
  MP_DECLARED+=("$2")
  MEGATRON_PRUNE_ENV_FLAGS+="$1=$2 "
  if [[ -n "${!2:-}" ]]; then MP_FLAGS+=("$1" "${!2}"); fi
}

# mp_list FLAG VAR: a space-separated variable as one multi-value flag (INPUT='a.jsonl b.jsonl' -> --input a b).
# Words are not glob-expanded here: the CLI expands quoted globs itself.
mp_list() {
  MP_DECLARED+=("$2")
  MEGATRON_PRUNE_ENV_FLAGS+="$1=$2 "
  local words
  read -r -a words <<< "${!2:-}"
  if (( ${#words[@]} )); then MP_FLAGS+=("$1" "${words[@]}"); fi
}

# mp_switch NAME VAR [DEFAULT]: VAR=1 -> --NAME, VAR=0 -> --no-NAME (the CLI takes both, so a later flag still
# wins), unset -> DEFAULT (or nothing).
mp_switch() {
  MP_DECLARED+=("$2")
  local value=${!2:-${3:-}}
  case "$value" in
    1) MP_FLAGS+=("--$1") ;;
    0) MP_FLAGS+=("--no-$1") ;;
    "") ;;
    *) echo "error: $2 must be 0 or 1, got '$value'" >&2; exit 2 ;;
  esac
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
