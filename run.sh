#!/usr/bin/env bash
# SALAD training system: set-up, tests and whole rounds.
#
#   ./run.sh test [PYTEST_ARGS...]   install what is missing, then run the test suite
#   ./run.sh setup                   install what is missing (.venv, requirements, espeak-ng)
#   ./run.sh [CONFIG] [key=value...] run the rounds of an experiment (default: the toy world)
#
# Rounds: round 0 = stage-I training + eval; round r = selection, stage-II training, eval; then the
# report. Each job skips what is complete, so a killed run continues where it stopped. Set
# SALAD_LAUNCH to run the jobs under a launcher, e.g.
#   SALAD_LAUNCH="torchrun --standalone --nproc_per_node 8 -m" ./run.sh configs/qwen2.5-3b-mimi.yaml
#   SALAD_LAUNCH="deepspeed --hostfile hosts --num_gpus 8 --module" ./run.sh configs/qwen2.5-3b-mimi.yaml
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

run_rounds() {
  local config=$1; shift
  local launch rounds
  read -r -a launch <<< "${SALAD_LAUNCH:-$PY -m}"
  rounds=$("$PY" -m train.experiment "$config" "$@" --get rounds)
  for ((r = 0; r <= rounds; r++)); do
    if [ "$r" -gt 0 ]; then
      log "round $r: selection"
      "${launch[@]}" selection --config "$config" --round "$r" "$@"
    fi
    log "round $r: training"
    "${launch[@]}" train --config "$config" --round "$r" "$@"
    log "round $r: evaluation"
    "${launch[@]}" eval --config "$config" --round "$r" "$@"
  done
  "$PY" -m eval.report --config "$config" "$@"
}

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
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    ;;
  *)
    setup
    config=configs/toy.yaml
    if [ $# -gt 0 ] && [[ "$1" != *=* ]]; then config=$1; shift; fi
    if [ ! -f "$config" ]; then
      log "config $config not found (the toy default is not built yet: try ./run.sh configs/smoke.yaml)"
      exit 2
    fi
    run_rounds "$config" "$@"
    ;;
esac
