#!/usr/bin/env bash
# SALAD training system: set-up, tests and whole rounds.
#
#   ./run.sh test [PYTEST_ARGS...]   install what is missing, then run the test suite
#   ./run.sh setup                   install what is missing (.venv, requirements, espeak-ng)
#   ./run.sh [CONFIG] [key=value...] run the rounds of an experiment (default: the toy world)
#   ./run.sh ablation [CONFIG] [--seeds 0,1,2] [key=value...]
#                                    per seed, active selection, then uniform and natural-only from the same
#                                    round 0, then the side-by-side table runs/<name>-ablation.{json,md}
#
# This script installs what is missing and hands the rounds to `python -m rounds` (rounds/__main__.py says how
# they run, resume and take launchers: SALAD_LAUNCH, SALAD_EVAL_LAUNCH), e.g.
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
  # 2-core CPU machines: spinning OpenMP threads made steps 10-20x slower.
  export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
  export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
  export TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1}
  export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
  fi
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
}

ensure_ds_ops() {
  # Without GPUs DeepSpeed compiles its shared-memory communication op at the first distributed start (about a
  # minute on 2 cores, cached under ~/.cache/torch_extensions): set-up work, done here once rather than inside
  # the first training job.
  local stamp="$VENV/.deepspeed_cpu_ops"
  if [ "${DS_ACCELERATOR:-}" = cpu ] && [ ! -f "$stamp" ]; then
    log "compiling DeepSpeed's CPU communication op (once)"
    "$PY" -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null 2>&1 && touch "$stamp"
  fi
}

setup() { ensure_system; ensure_venv; runtime_env; ensure_ds_ops; }

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
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    ;;
  *)
    setup
    exec "$PY" -m rounds "$@"
    ;;
esac
