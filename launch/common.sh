# Shell helpers shared by launch/tpu_pod.sh and launch/single_host.sh (sourced, not run).
# The caller sets SCRIPT_NAME and DRY_RUN (1: print commands, run nothing).

SAFE_WORD='^[A-Za-z0-9_./:=,@%+^-]+$'

die() {
  echo "${SCRIPT_NAME}: error: $*" >&2
  echo "Run 'launch/${SCRIPT_NAME} --help' for usage." >&2
  exit 2
}

# Prints one command line, quoting only the words that need it.
show() {
  local out="+" word
  for word in "$@"; do
    if [[ "$word" =~ $SAFE_WORD ]]; then
      out+=" $word"
    else
      out+=" '${word//\'/\'\\\'\'}'"
    fi
  done
  printf '%s\n' "$out"
}

# Prints a command and, unless this is a dry run, runs it.
run() {
  show "$@"
  if [[ "$DRY_RUN" != 1 ]]; then
    "$@"
  fi
}

need_value() {
  [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value"
}
