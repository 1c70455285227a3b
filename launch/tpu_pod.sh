#!/usr/bin/env bash
# Launches msk_jax pretraining on a Cloud TPU VM pod slice: one process per TPU VM worker, all
# started together with `gcloud compute tpus tpu-vm ssh --worker=all`, writing to a gs:// workdir.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --name NAME --zone ZONE --workdir gs://BUCKET/RUN [options] [-- MAIN_ARGS...]

Copies this checkout to every worker of a Cloud TPU VM (pod slice), makes a Python 3.12 virtual
environment there with uv (.venv in the code's folder), installs the requirements and jax[tpu]
into it, and runs on all workers at once, one process per worker (it drives all of the worker's
TPU chips):
  .venv/bin/python -m msk_jax.main --config=CONFIG --workdir=gs://... --multihost MAIN_ARGS...

Required:
  --name NAME               TPU VM name
  --zone ZONE               e.g. us-central2-b
  --workdir gs://...        checkpoints, metrics and evaluations (shared by all workers: must be gs://)

Options:
  --project PROJECT         Google Cloud project (default: gcloud's configured project)
  --config FILE[:VARIANT]   training configuration (default: configs/howto.py)
  --create                  create the TPU VM first if it does not exist
  --accelerator-type TYPE   for --create (default: v4-32)
  --version RUNTIME         TPU software version, for --create (default by accelerator type:
                            v6e v2-alpha-tpuv6e, v5p v2-alpha-tpuv5, v5litepod/v5e v2-alpha-tpuv5-lite,
                            v2/v3/v4 tpu-ubuntu2204-base)
  --python-version X.Y      the workers' Python (default: 3.12; the pins need 3.11 or newer)
  --jax-version VERSION     jax[tpu] version to install (default: the jax pin of requirements.txt)
  --remote-dir DIR          where the code goes on the workers (default: msk_jax, under the home
                            directory); a folder of its own: it is replaced on every copy
  --skip-copy               do not copy the code (already there)
  --skip-install            do not install packages
  --detach                  run in the background on the workers (nohup, log in ~/msk_jax_train.log)
  --dry-run                 print every command (prefixed with '+ ') and run nothing
  -h, --help                this help

The code sent is the checkout's tracked files (git ls-files) as they are in the working tree,
uncommitted edits included; untracked and ignored files (keys, .env, data, virtual environments)
stay behind, so `git add` a new file that the workers need. The tarball is a private temporary
file (mktemp), removed when the launcher exits. On each worker, DIR is replaced only if it holds
the marker .msk_jax_launch that the launcher writes there, or is empty or absent; any other DIR
stops the launch with an error naming it.

Everything after `--` goes to msk_jax.main unchanged, e.g.
  launch/tpu_pod.sh --name msk --zone us-central2-b --workdir gs://my-bucket/msk/run1 \
    --create --accelerator-type v4-32 -- --config.data.source=tfds --config.data.tfds_data_dir=gs://my-bucket/tfds
EOF
}

SCRIPT_NAME="tpu_pod.sh"
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# Quotes words for the workers' shell (inside gcloud ssh --command): double quotes where they
# suffice (readable in the dry run), else printf %q.
remote_quote() {
  local out="" word
  for word in "$@"; do
    if [[ "$word" =~ $SAFE_WORD ]]; then
      out+=" $word"
    elif [[ "$word" != *[\"\$\`\\!]* ]]; then
      out+=" \"$word\""
    else
      out+=" $(printf '%q' "$word")"
    fi
  done
  printf '%s' "${out# }"
}

# The file that marks a worker's code folder as made by this launcher: only such a folder (or an
# empty one) is removed before a new copy, so a mistyped --remote-dir cannot delete anything else.
MARKER=".msk_jax_launch"

# Prints a path with runs of '/' made one and no '/' at the end.
squeeze_slashes() {
  local path
  path="$(printf '%s' "$1" | tr -s /)"
  printf '%s' "${path%/}"
}

# Refuses --remote-dir values that name no folder of its own (the root, the home directory, '.'
# or a way up with '..'), and '~' or '$' words, which the workers' shell receives quoted and
# would not expand.
check_remote_dir() {
  local dir="$1" home="${HOME:-}" part named=0
  local -a parts
  [[ -n "$dir" ]] || die "--remote-dir needs a value"
  [[ "$dir" != "~"* && "$dir" != *[\$\`]* ]] ||
    die "--remote-dir must be a plain path (relative to the workers' home directory, or absolute), got '$dir'"
  IFS=/ read -r -a parts <<< "$dir"
  for part in "${parts[@]}"; do
    [[ "$part" != ".." ]] || die "--remote-dir must not contain '..', got '$dir'"
    if [[ -n "$part" && "$part" != "." ]]; then
      named=1
    fi
  done
  # This machine's home directory ('~' expands to it before the launcher sees it), however many
  # slashes it is written with, is no folder of its own either.
  [[ "$named" -eq 1 && "$(squeeze_slashes "$dir")" != "$(squeeze_slashes "$home")" ]] ||
    die "--remote-dir must name a folder of its own for the code (e.g. msk_jax), got '$dir'"
}

# Prints the checkout's tracked files that are in the working tree, NUL-separated (a file deleted
# but not committed yet is left out).
tracked_files() {
  local file
  git -C "$REPO" ls-files -z --recurse-submodules | while IFS= read -r -d '' file; do
    if [[ -e "$REPO/$file" || -L "$REPO/$file" ]]; then
      printf '%s\0' "$file"
    fi
  done
}

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NAME="" ZONE="" PROJECT="" WORKDIR=""
CONFIG="configs/howto.py"
ACCELERATOR_TYPE="v4-32"
RUNTIME_VERSION=""
PYTHON_VERSION="3.12"
JAX_VERSION="$(sed -n 's/^jax==\([^[:space:]#]*\).*/\1/p' "$REPO/requirements.txt" 2>/dev/null | head -n 1)"
JAX_VERSION="${JAX_VERSION:-0.10.2}"
REMOTE_DIR="msk_jax"
CREATE=0 SKIP_COPY=0 SKIP_INSTALL=0 DETACH=0 DRY_RUN=0
MAIN_ARGS=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --create) CREATE=1; shift ;;
    --skip-copy) SKIP_COPY=1; shift ;;
    --skip-install) SKIP_INSTALL=1; shift ;;
    --detach) DETACH=1; shift ;;
    --name=*) NAME="${1#*=}"; shift ;;
    --zone=*) ZONE="${1#*=}"; shift ;;
    --project=*) PROJECT="${1#*=}"; shift ;;
    --workdir=*) WORKDIR="${1#*=}"; shift ;;
    --config=*) CONFIG="${1#*=}"; shift ;;
    --accelerator-type=*) ACCELERATOR_TYPE="${1#*=}"; shift ;;
    --version=*) RUNTIME_VERSION="${1#*=}"; shift ;;
    --python-version=*) PYTHON_VERSION="${1#*=}"; shift ;;
    --jax-version=*) JAX_VERSION="${1#*=}"; shift ;;
    --remote-dir=*) REMOTE_DIR="${1#*=}"; shift ;;
    --name|--zone|--project|--workdir|--config|--accelerator-type|--version|--python-version|--jax-version|--remote-dir)
      need_value "$@"
      case "$1" in
        --name) NAME="$2" ;;
        --zone) ZONE="$2" ;;
        --project) PROJECT="$2" ;;
        --workdir) WORKDIR="$2" ;;
        --config) CONFIG="$2" ;;
        --accelerator-type) ACCELERATOR_TYPE="$2" ;;
        --version) RUNTIME_VERSION="$2" ;;
        --python-version) PYTHON_VERSION="$2" ;;
        --jax-version) JAX_VERSION="$2" ;;
        --remote-dir) REMOTE_DIR="$2" ;;
      esac
      shift 2 ;;
    --) shift; MAIN_ARGS=("$@"); break ;;
    *) die "unknown argument '$1' (arguments for msk_jax.main go after '--')" ;;
  esac
done

[[ -n "$NAME" ]] || die "--name is required (the TPU VM name)"
[[ -n "$ZONE" ]] || die "--zone is required (e.g. us-central2-b)"
[[ -n "$WORKDIR" ]] || die "--workdir is required (a gs:// path shared by all workers)"
[[ "$WORKDIR" == gs://?* ]] || die "--workdir must be a gs:// path on a pod (every worker writes there), got '$WORKDIR'"
[[ "$CONFIG" != /* && -f "$REPO/${CONFIG%%:*}" ]] ||
  die "--config '${CONFIG%%:*}' is not a file of this checkout (give it relative to $REPO)"

check_remote_dir "$REMOTE_DIR"
# The code travels as the checkout's tracked files: a real run needs git and a tracked config
# (a dry run reads nothing).
if [[ "$SKIP_COPY" -eq 0 && "$DRY_RUN" -eq 0 ]]; then
  git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1 ||
    die "$REPO is not a git checkout (or git is missing): the code sent to the workers is its tracked files"
  git -C "$REPO" ls-files --error-unmatch -- "${CONFIG%%:*}" >/dev/null 2>&1 ||
    die "--config '${CONFIG%%:*}' is not tracked by git, so it would not reach the workers (git add it)"
fi

[[ "$PYTHON_VERSION" =~ ^3\.(1[1-9]|[2-9][0-9])$ ]] ||
  die "--python-version must be 3.11 or newer (the pinned numpy, scipy and jax need it), got '$PYTHON_VERSION'"

# The TPU software version Google names for JAX on each generation ("TPU software versions").
if [[ -z "$RUNTIME_VERSION" && "$CREATE" -eq 1 ]]; then
  case "$ACCELERATOR_TYPE" in
    v6e-*) RUNTIME_VERSION="v2-alpha-tpuv6e" ;;
    v5p-*) RUNTIME_VERSION="v2-alpha-tpuv5" ;;
    v5litepod-*|v5e-*) RUNTIME_VERSION="v2-alpha-tpuv5-lite" ;;
    v2-*|v3-*|v4-*) RUNTIME_VERSION="tpu-ubuntu2204-base" ;;
    *) die "no default TPU software version for accelerator type '$ACCELERATOR_TYPE': give --version" ;;
  esac
fi

GCLOUD_FLAGS=("--zone=$ZONE")
if [[ -n "$PROJECT" ]]; then
  GCLOUD_FLAGS+=("--project=$PROJECT")
fi
TPU=(gcloud compute tpus tpu-vm)

# 1. The TPU VM.
if [[ "$CREATE" -eq 1 ]]; then
  CREATE_CMD=("${TPU[@]}" create "$NAME" "${GCLOUD_FLAGS[@]}" "--accelerator-type=$ACCELERATOR_TYPE"
              "--version=$RUNTIME_VERSION")
  if [[ "$DRY_RUN" -eq 1 ]]; then
    show "${TPU[@]}" describe "$NAME" "${GCLOUD_FLAGS[@]}"
    show "${CREATE_CMD[@]}"
    echo "  (create runs only if describe finds no TPU VM named $NAME)"
  else
    show "${TPU[@]}" describe "$NAME" "${GCLOUD_FLAGS[@]}"
    if "${TPU[@]}" describe "$NAME" "${GCLOUD_FLAGS[@]}" >/dev/null 2>&1; then
      echo "TPU VM $NAME exists."
    else
      run "${CREATE_CMD[@]}"
    fi
  fi
fi

# 2. The code: a tarball of the checkout's tracked files (working-tree contents), in a private
# temporary file (mktemp: mode 600, a name no one can guess) that is removed on exit. On each
# worker the folder is replaced only if the launcher made it (its marker file) or it is empty
# or absent; the marker is written into the new one.
if [[ "$SKIP_COPY" -eq 0 ]]; then
  if [[ "$DRY_RUN" -eq 1 ]]; then
    TARBALL="${TMPDIR:-/tmp}/msk_jax.XXXXXXXXXX"
  else
    TARBALL="$(mktemp "${TMPDIR:-/tmp}/msk_jax.XXXXXXXXXX")"
    trap 'rm -f "$TARBALL"' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
  fi
  PACK=(env COPYFILE_DISABLE=1 tar -czf "$TARBALL" -C "$REPO" --null -T -)
  printf '%s |%s\n' "$(show git -C "$REPO" ls-files -z --recurse-submodules)" "$(show "${PACK[@]}" | cut -c2-)"
  if [[ "$DRY_RUN" -eq 0 ]]; then
    tracked_files | "${PACK[@]}"
  fi
  run "${TPU[@]}" scp "$TARBALL" "$NAME:msk_jax.tar.gz" --worker=all "${GCLOUD_FLAGS[@]}"
  run rm -f "$TARBALL"
  DIR_Q="$(remote_quote "$REMOTE_DIR")"
  MARKER_Q="$(remote_quote "$REMOTE_DIR/$MARKER")"
  UNPACK="if [ -e $DIR_Q ] && [ ! -f $MARKER_Q ] && ! rmdir $DIR_Q 2>/dev/null; then"
  UNPACK+=" printf 'tpu_pod.sh: error: %s on %s has files and no $MARKER (this launcher did not make it): not removing it; move it or choose another --remote-dir\n' $DIR_Q \"\$(hostname)\" >&2; exit 1; fi"
  UNPACK+=" && rm -rf $DIR_Q && mkdir -p $DIR_Q && touch $MARKER_Q && tar -xzf msk_jax.tar.gz -C $DIR_Q && rm -f msk_jax.tar.gz"
  run "${TPU[@]}" ssh "$NAME" --worker=all "${GCLOUD_FLAGS[@]}" --command="$UNPACK"
fi

# 3. Packages. The TPU images' own Python is 3.10 (Ubuntu 22.04), older than the pins allow, so
# uv (from PyPI, through the image's pip, no root) makes a virtual environment with a Python
# of PYTHON_VERSION (the image's if it has one, else a standalone build uv fetches); its version
# is checked before anything is installed into it. Then the requirements and jax[tpu]; the demo
# corpus also needs the Asterisk sounds.
VENV_PYTHON=".venv/bin/python"
CHECK="import sys; v = sys.version_info[:2]; sys.exit(0 if v >= (3, 11) else 'tpu_pod.sh: error: $VENV_PYTHON is Python %d.%d; the pinned requirements need 3.11 or newer (--python-version)' % v)"
if [[ "$SKIP_INSTALL" -eq 0 ]]; then
  INSTALL="cd $(remote_quote "$REMOTE_DIR")"
  INSTALL+=" && { python3 -m pip install -q --user uv || python3 -m pip install -q --user --break-system-packages uv; }"
  INSTALL+=" && python3 -m uv venv -q --allow-existing --python $PYTHON_VERSION .venv"
  INSTALL+=" && $VENV_PYTHON -c \"$CHECK\""
  INSTALL+=" && python3 -m uv pip install -q --python $VENV_PYTHON -r requirements.txt $(remote_quote "jax[tpu]==$JAX_VERSION")"
  if [[ "$CONFIG" == *demo* ]]; then
    SOUNDS="asterisk-core-sounds-en-wav asterisk-core-sounds-fr-wav asterisk-core-sounds-es-wav asterisk-core-sounds-it-wav asterisk-core-sounds-ru-wav"
    INSTALL="sudo apt-get update -qq && sudo apt-get install -y -qq $SOUNDS && $INSTALL"
  fi
  run "${TPU[@]}" ssh "$NAME" --worker=all "${GCLOUD_FLAGS[@]}" --command="$INSTALL"
fi

# 4. Training: the same command on every worker; jax.distributed.initialize() finds the pod.
TRAIN="$VENV_PYTHON -m msk_jax.main $(remote_quote "--config=$CONFIG" "--workdir=$WORKDIR") --multihost"
if [[ ${#MAIN_ARGS[@]} -gt 0 ]]; then
  TRAIN+=" $(remote_quote "${MAIN_ARGS[@]}")"
fi
if [[ "$DETACH" -eq 1 ]]; then
  TRAIN="nohup $TRAIN > ~/msk_jax_train.log 2>&1 < /dev/null &"
fi
run "${TPU[@]}" ssh "$NAME" --worker=all "${GCLOUD_FLAGS[@]}" --command="cd $(remote_quote "$REMOTE_DIR") && $TRAIN"
