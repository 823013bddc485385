#!/usr/bin/env bash
# SALAD training system: set-up, tests and whole rounds.
#
#   ./run.sh test [PYTEST_ARGS...]   install what is missing, then run the test suite
#   ./run.sh setup                   install what is missing (.venv, requirements, espeak-ng)
#   ./run.sh [CONFIG] [key=value...] run the rounds of an experiment (default: the toy world)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

log() { printf '\033[1m[run.sh]\033[0m %s\n' "$*" >&2; }

ensure_system() {
  if ! command -v espeak-ng >/dev/null 2>&1; then
    log "installing espeak-ng (apt-get)"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq && $sudo apt-get install -y -qq espeak-ng >/dev/null
  fi
}

ensure_venv() {
  local stamp="$VENV/.requirements.sha256"
  local want
  want=$(sha256sum requirements.txt | cut -d' ' -f1)
  if [ ! -x "$PY" ]; then
    log "creating $VENV"
    python3 -m venv "$VENV"
  fi
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    log "installing requirements.txt into .venv (first time: a few minutes)"
    "$PY" -m pip install -q --disable-pip-version-check -r requirements.txt
    echo "$want" > "$stamp"
  fi
}

runtime_env() {
  # 2-core CPU machines: spinning OpenMP threads made steps 10-20x slower (ENVIRONMENT.md).
  export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
  export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
  export TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1}
  export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
  fi
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
}

setup() { ensure_system; ensure_venv; runtime_env; }

case "${1:-}" in
  test)
    shift
    setup
    exec "$PY" -m pytest "$@"
    ;;
  setup)
    setup
    log "ready: $VENV"
    ;;
  -h|--help|help)
    sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
    ;;
  *)
    setup
    if [ ! -f "$ROOT/configs/toy.yaml" ] || [ ! -f "$ROOT/train/__main__.py" ]; then
      log "the rounds driver is not built yet; available now: ./run.sh test, python -m shards.build"
      sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
      exit 2
    fi
    exec "$PY" -m train.rounds "$@"
    ;;
esac
