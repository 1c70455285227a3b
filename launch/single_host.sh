#!/usr/bin/env bash
# Runs msk_jax pretraining on one machine (CPU, one or more GPUs, or a single-host TPU VM):
# one process using every local device. Installs nothing unless asked (--install).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/single_host.sh --workdir DIR [--config FILE[:VARIANT]] [options] [-- MAIN_ARGS...]

Runs, from the checkout's root, one process that drives every visible GPU (or TPU chip):
  python -m msk_jax.main --config=CONFIG --workdir=WORKDIR MAIN_ARGS...
Its first line is the layout, e.g. "layout: 1 process x 8 gpu devices = 8 devices"; --gpus
chooses the GPUs.

Options (most also an environment variable):
  --workdir DIR        WORKDIR     required; rerunning with the same DIR resumes
  --config FILE        CONFIG      default configs/howto.py (configs/howto.py:demo: the demo corpus)
  --python PATH        PYTHON      default: .venv/bin/python of the checkout if present, else python3
  --gpus LIST                      CUDA_VISIBLE_DEVICES for the run, e.g. 0,1
  --install                        first pip install -r requirements.txt
  --jax-extra EXTRA                with --install, also install jax[EXTRA] at the pinned version
                                   (cuda12 for NVIDIA GPUs, tpu for a TPU VM)
  --dry-run            DRY_RUN=1   print every command (prefixed with '+ ') and run nothing
                       EXTRA_ARGS  extra msk_jax.main arguments, split on spaces (added before
                                   the ones after `--`)
  -h, --help                       this help

Examples:
  launch/single_host.sh --config configs/howto.py:demo --workdir /tmp/msk_demo
  launch/single_host.sh --workdir /runs/msk --gpus 0,1 -- --config.data.csv=/data/howto/train.csv
EOF
}

SCRIPT_NAME="single_host.sh"
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"


REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORKDIR="${WORKDIR:-}"
CONFIG="${CONFIG:-configs/howto.py}"
PYTHON="${PYTHON:-}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
DRY_RUN="${DRY_RUN:-0}"
GPUS=""
INSTALL=0
JAX_EXTRA=""
MAIN_ARGS=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --install) INSTALL=1; shift ;;
    --workdir=*) WORKDIR="${1#*=}"; shift ;;
    --config=*) CONFIG="${1#*=}"; shift ;;
    --python=*) PYTHON="${1#*=}"; shift ;;
    --gpus=*) GPUS="${1#*=}"; shift ;;
    --jax-extra=*) JAX_EXTRA="${1#*=}"; shift ;;
    --workdir|--config|--python|--gpus|--jax-extra)
      need_value "$@"
      case "$1" in
        --workdir) WORKDIR="$2" ;;
        --config) CONFIG="$2" ;;
        --python) PYTHON="$2" ;;
        --gpus) GPUS="$2" ;;
        --jax-extra) JAX_EXTRA="$2" ;;
      esac
      shift 2 ;;
    --) shift; MAIN_ARGS=("$@"); break ;;
    *) die "unknown argument '$1' (arguments for msk_jax.main go after '--')" ;;
  esac
done

[[ "$DRY_RUN" == 0 || "$DRY_RUN" == 1 ]] || die "DRY_RUN must be 0 or 1, got '$DRY_RUN'"
[[ -n "$WORKDIR" ]] || die "the workdir is required: --workdir DIR or WORKDIR=DIR"
[[ -f "$REPO/${CONFIG%%:*}" || -f "${CONFIG%%:*}" ]] || die "config file '${CONFIG%%:*}' not found (relative to $REPO)"
# The run starts in the checkout: paths relative to the current directory are made absolute.
if [[ "$CONFIG" != /* && ! -f "$REPO/${CONFIG%%:*}" ]]; then
  CONFIG="$PWD/$CONFIG"
fi
if [[ "$WORKDIR" != /* && "$WORKDIR" != *://* ]]; then
  WORKDIR="$PWD/$WORKDIR"
fi
[[ -z "$JAX_EXTRA" || "$INSTALL" -eq 1 ]] || die "--jax-extra needs --install"
[[ -z "$JAX_EXTRA" || "$JAX_EXTRA" =~ ^(cuda12|tpu)$ ]] || die "--jax-extra must be cuda12 or tpu, got '$JAX_EXTRA'"
if [[ -z "$PYTHON" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then
    PYTHON="$REPO/.venv/bin/python"
  else
    PYTHON="python3"
  fi
fi

EXTRA=()
if [[ -n "$EXTRA_ARGS" ]]; then
  read -r -a EXTRA <<< "$EXTRA_ARGS"
fi

run cd "$REPO"
if [[ "$INSTALL" -eq 1 ]]; then
  PACKAGES=(-r requirements.txt)
  if [[ -n "$JAX_EXTRA" ]]; then
    JAX_VERSION="$(sed -n 's/^jax==\([^[:space:]#]*\).*/\1/p' "$REPO/requirements.txt" | head -n 1)"
    PACKAGES+=("jax[$JAX_EXTRA]==${JAX_VERSION:-0.10.2}")
  fi
  run "$PYTHON" -m pip install "${PACKAGES[@]}"
fi

ENV=()
if [[ -n "$GPUS" ]]; then
  ENV=(env "CUDA_VISIBLE_DEVICES=$GPUS")
fi
run ${ENV[@]+"${ENV[@]}"} "$PYTHON" -m msk_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" \
  ${EXTRA[@]+"${EXTRA[@]}"} ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"}
