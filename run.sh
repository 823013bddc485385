#!/usr/bin/env bash
# SALAD training system: set-up, tests and whole rounds.
#
#   ./run.sh test [PYTEST_ARGS...]   install what is missing, then run the test suite
#   ./run.sh setup                   install what is missing (.venv, requirements, espeak-ng)
#   ./run.sh [CONFIG] [key=value...] run the rounds of an experiment (default: the toy world)
#   ./run.sh ablation [CONFIG] [--seeds 0,1,2] [key=value...]
#                                    per seed (default: the config's), the rounds of <name>-s<seed> (active
#                                    selection), then of <name>-s<seed>-uniform (gamma 0) and -natural (no
#                                    selection: the same steps on natural speech) from the active run's round 0;
#                                    then the side-by-side table runs/<name>-ablation.{json,md} (eval.compare)
#
# Rounds: round 0 = stage-I training + eval; round r = selection, stage-II training, eval; then the
# report. Each job skips what is complete, so a killed run continues where it stopped. Set
# SALAD_LAUNCH to run the jobs under a launcher, e.g.
#   SALAD_LAUNCH="torchrun --standalone --nproc_per_node 8 -m" ./run.sh configs/qwen2.5-3b-mimi.yaml
#   SALAD_LAUNCH="deepspeed --hostfile hosts --num_gpus 8 --module" ./run.sh configs/qwen2.5-3b-mimi.yaml
# SALAD_EVAL_LAUNCH overrides it for eval alone. Without either, on a machine without GPUs, eval runs one
# process per core (at most 8; items split across ranks): its many small per-item passes keep one core busy
# each, where one process with several threads does not.
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

default_eval_launch() {
  local procs
  procs=$(nproc 2>/dev/null || echo 1)
  procs=$((procs > 8 ? 8 : procs))
  if command -v nvidia-smi >/dev/null 2>&1 || [ "$procs" -lt 2 ]; then
    echo "$PY -m"
  else
    echo "$PY -m torch.distributed.run --standalone --nproc_per_node $procs -m"
  fi
}

run_rounds() {
  # run_rounds ROUNDS CONFIG [key=value...]: rounds 0..ROUNDS, then the report
  local rounds=$1 config=$2; shift 2
  local launch eval_launch
  read -r -a launch <<< "${SALAD_LAUNCH:-$PY -m}"
  read -r -a eval_launch <<< "${SALAD_EVAL_LAUNCH:-${SALAD_LAUNCH:-$(default_eval_launch)}}"
  for ((r = 0; r <= rounds; r++)); do
    if [ "$r" -gt 0 ]; then
      log "round $r: selection"
      "${launch[@]}" selection --config "$config" --round "$r" "$@"
    fi
    log "round $r: training"
    "${launch[@]}" train --config "$config" --round "$r" "$@"
    log "round $r: evaluation"
    "${eval_launch[@]}" eval --config "$config" --round "$r" "$@"
  done
  "$PY" -m eval.report --config "$config" "$@"
}

link_copy() {
  # Copy folder $1 to $2 as hard links (files are replaced by rename, never written in place, so the copies
  # stay independent), unless $2 exists; a killed copy leaves only a temp folder, removed on the next try.
  local src=$1 dst=$2
  local tmp
  tmp="$(dirname "$dst")/.$(basename "$dst").partial"
  [ -e "$dst" ] && return 0
  rm -rf "$tmp"
  cp -al "$src" "$tmp" 2>/dev/null || { rm -rf "$tmp"; cp -a "$src" "$tmp"; }
  mv "$tmp" "$dst"
}

reuse_stage1() {
  # An ablation variant starts from the active run's round 0 (the same stage-I student), with its caches
  # (pool embeddings, spoken benchmarks); not its data.yaml, which lists the active run's selected speech.
  local src=$1 dst=$2 part
  if [ ! -f "$src/round-0/DONE" ] || [ ! -f "$src/round-0/eval.json" ]; then
    log "$src/round-0 is not complete: cannot start $dst from it"
    exit 1
  fi
  mkdir -p "$dst"
  for part in round-0 pool_embeddings spoken; do
    if [ -d "$src/$part" ]; then link_copy "$src/$part" "$dst/$part"; fi
  done
}

run_ablation() {
  local config=$1 seeds=$2; shift 2
  local values rounds seed name dir s base variant runs=()
  values=$("$PY" -m rounds.experiment "$config" "$@" --get rounds seed run.name run.dir)
  read -r rounds seed name dir <<< "$values"
  for s in ${seeds:-$seed}; do
    base="$name-s$s"
    log "ablation, seed $s: active selection ($dir/$base)"
    run_rounds "$rounds" "$config" "$@" "seed=$s" "run.name=$base" selection.strategy=active
    runs+=("$dir/$base")
    for variant in uniform natural; do
      log "ablation, seed $s: $variant ($dir/$base-$variant, from $base's round 0)"
      reuse_stage1 "$dir/$base" "$dir/$base-$variant"
      run_rounds "$rounds" "$config" "$@" "seed=$s" "run.name=$base-$variant" "selection.strategy=$variant"
      runs+=("$dir/$base-$variant")
    done
  done
  "$PY" -m eval.compare "${runs[@]}" --out "$dir/$name-ablation"
}

check_seeds() {
  if ! [[ "$1" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
    log "--seeds '$1': expected seeds separated by commas, e.g. --seeds 0,1,2"
    exit 2
  fi
}

require_config() {
  if [ ! -f "$1" ]; then
    log "config $1 not found (the toy default is not built yet: try ./run.sh configs/smoke.yaml)"
    exit 2
  fi
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
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
    ;;
  ablation)
    shift
    config=configs/toy.yaml seeds="" overrides=()
    if [ $# -gt 0 ] && [[ "$1" != *=* ]] && [[ "$1" != -* ]]; then config=$1; shift; fi
    while [ $# -gt 0 ]; do
      case "$1" in
        --seeds) seeds=${2:-}; shift $(($# > 1 ? 2 : 1)); check_seeds "$seeds" ;;
        --seeds=*) seeds=${1#--seeds=}; shift; check_seeds "$seeds" ;;
        *=*) overrides+=("$1"); shift ;;
        *) log "ablation: unexpected argument '$1' (usage: ./run.sh ablation [CONFIG] [--seeds 0,1,2] [key=value...])"
           exit 2 ;;
      esac
    done
    require_config "$config"
    setup
    run_ablation "$config" "${seeds//,/ }" "${overrides[@]}"
    ;;
  *)
    setup
    config=configs/toy.yaml
    if [ $# -gt 0 ] && [[ "$1" != *=* ]]; then config=$1; shift; fi
    require_config "$config"
    rounds=$("$PY" -m rounds.experiment "$config" "$@" --get rounds)
    run_rounds "$rounds" "$config" "$@"
    ;;
esac
