#!/usr/bin/env bash
# Every HistoTx check that needs a GPU, in one run (≤ 8 min on one H200), ending in ONE table:
# check, result, figure, target, pass/fail (issue 11).
#
#   1. python environment   interpreter, torch (against the pin 2.14.1), CUDA device, the project's imports
#   2. xformers             does its own C++/CUDA library (_C.so) load; does memory_efficient_attention run
#                           on CUDA with a packed (BlockDiagonalMask) bf16 batch, which operator xformers
#                           dispatched to and which kernels the profiler saw       (benchmarks/gpu_check.py)
#   3. agreement            xformers, flex, SDPA each against exact float64 attention of the same packed
#                           bf16 batch, output and gradients, within a first-order rounding bound
#                           derived from bf16's unit roundoff and the sizes        (benchmarks/attention.py)
#   4. attention TFLOP/s    each backend at ViT-L's heads (16 × 64), batch 32, 2 µm and 16 µm token counts
#   5. MFU                  ViT-L/16 bf16 ZeRO-2 training steps, target ≥ 45 %     (benchmarks/gpu_train_check.py)
#   6. loader               GPU and CPU JPEG decode          (benchmarks/train_step.py --loader-only ...)
# pass/fail reads PASS or FAIL against the target, SKIP where nothing was measured (no CUDA, dry run),
# INFO for a figure with no target. Each step runs with its own time limit; a step that fails or times
# out is a FAIL row naming why, never the end of the script. The table is printed last and written to
# OUT/table.md and OUT/table.json, beside each step's log (OUT/STEP.log), exit status (OUT/STEP.rc) and
# figures (OUT/STEP.json).
#
# On the GPU machine, from the repository root:
#     bash benchmarks/gpu_check.sh                      # OUT: $GPU_CHECK_OUT, else --out DIR, else out/gpu_check
#     GPU_CHECK_OUT=$OUT bash benchmarks/gpu_check.sh   # on the device tool's machine: the files come back
# Without a GPU (or with --dry-run / GPU_CHECK_DRY_RUN=1) the same steps run on CPU at tiny sizes, to
# check every command line and the table: GPU-only rows read 'skipped (no CUDA)', the agreement runs in
# float32 (SDPA against float64), the training check on configs/train/tiny_cpu.yaml, the loader with CPU
# decode. tests/test_gpu_check.py runs this dry run.
#
# Python: $PYTHON if set; else ./.venv/bin/python if it runs and imports torch (a venv made by `make
# install` on this machine; a copy of the tree on another machine has none, or one that cannot run
# there); else python3 (on the device machine: the image's Python 3.12 with a CUDA torch). The tree is
# put on PYTHONPATH, so nothing is installed for histotx itself. When a module the checks import is
# missing (GPU_CHECK_INSTALL=auto, the default; never: do not install; pin: also replace torch):
#   - if .gpu_check/wheels/ holds wheels (see --prepare), pip installs offline (--no-index, --no-deps)
#     every one whose distribution is not installed, leaving installed packages (torch too) as they are;
#   - else pip installs from the registry: `pip install torch==T torchvision -e .[dev]` then
#     `pip install --no-deps xformers`, T the interpreter's own torch if it has one (keeping its CUDA
#     build; the pin if GPU_CHECK_INSTALL=pin), else the pin 2.14.1.
# The device machine reaches no registry, so there only the carried wheels work, and its torch is the
# image's: the environment row names the torch that actually ran against the pin. To run there:
#     bash benchmarks/gpu_check.sh --prepare   # HERE, with pip's network: .gpu_check/wheels (the project's
#                                              # needs the image lacks, cp312 manylinux, ~44 MiB) and
#                                              # .gpu_check/shards (the synthetic cohort's shards, ~8 MiB)
# then with the device tool: run(command="GPU_CHECK_OUT=$OUT bash benchmarks/gpu_check.sh",
# carry=[".gpu_check"], timeout_s=600). .gpu_check/shards, when present, is the training check's shard set.
#
# Environment: GPU_CHECK_SHARDS=DIR (a shard set for the training check; default .gpu_check/shards if
# there, else gpu_train_check.py makes the synthetic cohort's), GPU_CHECK_LOADER_SAMPLES (default 960,
# dry run 16), GPU_CHECK_BUDGET_S (480: each step's limit is cut so that the run ends within it),
# GPU_CHECK_TIMEOUT_<STEP> (seconds; STEP one of INSTALL ENV XFORMERS EQUIVALENCE ATTENTION TRAIN
# LOADER_CUDA LOADER_CPU).
set -uo pipefail
T0=$(date +%s)

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
TORCH_PIN=2.14.1
TORCHVISION_PIN=0.29.1
WHEELS="xformers deepspeed hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions
webdataset braceexpand imagecodecs simplejpeg zarr numcodecs donfig google-crc32c anndata array-api-compat natsort
legacy-api-wrap scverse-misc session-info2"

DRY=${GPU_CHECK_DRY_RUN:-0}
OUT=${GPU_CHECK_OUT:-}
PREPARE=0
PREP=.gpu_check
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --out) OUT=${2:?--out needs a folder}; shift ;;
    --out=*) OUT=${1#--out=} ;;
    --prepare) PREPARE=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

# ------------------------------------------------------------------------------------------- python
find_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  local cand
  for cand in "$REPO/.venv/bin/python" python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then echo "$cand"; return; fi
  done
  command -v python3 || echo python3
}
PY=$(find_python)

if [ "$PREPARE" = 1 ]; then
  # Wheels for the device machine's Python (3.12, manylinux x86-64) of what the project needs and its
  # image lacks, each at the version this tree's environment has (else the newest); deepspeed ships
  # an sdist only: built here into a pure-Python wheel. Then the synthetic cohort's shard set.
  pyver=${GPU_CHECK_WHEEL_PYTHON:-3.12}
  mkdir -p "$PREP/wheels"
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")" && { grep -qx "/$PREP/" "$exclude" 2>/dev/null || echo "/$PREP/" >>"$exclude"; }
  plat="--only-binary=:all: --python-version $pyver --implementation cp"
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 any; do
    plat="$plat --platform $p"
  done
  failed=""
  for pkg in $WHEELS; do
    ver=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$pkg" 2>/dev/null)
    spec=$pkg${ver:+==$ver}
    if [ "$pkg" = deepspeed ]; then
      "$PY" -m pip wheel -q --no-deps -w "$PREP/wheels" "$spec" || failed="$failed $spec"
    else
      # shellcheck disable=SC2086
      "$PY" -m pip download -q --no-deps $plat -d "$PREP/wheels" "$spec" || failed="$failed $spec"
    fi
  done
  if [ ! -f "$PREP/shards/manifest.json" ]; then
    rm -rf "$PREP/shards" "$PREP/tmp"
    "$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; import gpu_train_check as g; \
g.make_shards(Path(sys.argv[1]))" "$PREP/tmp" && mv "$PREP/tmp/shards" "$PREP/shards" || failed="$failed shards"
    rm -rf "$PREP/tmp"
  fi
  du -shc "$PREP/wheels" "$PREP/shards"
  echo "carry $PREP with the device tool (at most 64 MiB travel with the tree)"
  [ -z "$failed" ] || { echo "could not prepare:$failed" >&2; exit 1; }
  exit 0
fi

if [ -z "${GPU_CHECK_SHARDS:-}" ] && [ -f "$PREP/shards/manifest.json" ]; then GPU_CHECK_SHARDS=$REPO/$PREP/shards; fi
BUDGET=${GPU_CHECK_BUDGET_S:-480}
rm -f "$OUT"/*.rc "$OUT"/*.log "$OUT"/*.json "$OUT"/table.md

limit() {  # limit STEP DEFAULT: the step's time limit in seconds (GPU_CHECK_TIMEOUT_STEP overrides)
  local var="GPU_CHECK_TIMEOUT_$1"
  echo "${!var:-$2}"
}

STEPS_LEFT=7  # after install: env xformers equivalence attention train loader_cuda loader_cpu
run_step() {  # run_step NAME LIMIT CMD...: CMD's output to OUT/NAME.log, "status seconds limit" to OUT/NAME.rc
  local name=$1 lim=$2 start end rc left
  shift 2
  [ "$name" = install ] || STEPS_LEFT=$((STEPS_LEFT - 1))
  if [ "$DRY" != 1 ]; then  # on the GPU the whole run stays within the budget: 15 s kept for each later step
    left=$((BUDGET - ($(date +%s) - T0) - 15 * STEPS_LEFT))
    [ "$left" -lt "$lim" ] && lim=$left
    if [ "$lim" -lt 5 ]; then
      echo "not run: the ${BUDGET} s budget is spent" | tee "$OUT/$name.log"
      echo "124 0 0" >"$OUT/$name.rc"
      return
    fi
  fi
  echo "== $name (limit ${lim} s): $*"
  start=$(date +%s.%N)
  timeout --kill-after=10 "$lim" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  end=$(date +%s.%N)
  echo "$rc $(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }') $lim" >"$OUT/$name.rc"
  tail -n 4 "$OUT/$name.log" | cut -c1-200 | sed 's/^/   /'
  echo "   → exit $rc after $(cut -d' ' -f2 "$OUT/$name.rc") s"
}

# ------------------------------------------------------------------------------------------- install
INSTALL=${GPU_CHECK_INSTALL:-auto}
missing=""
if [ "$DRY" != 1 ] && [ "$INSTALL" != never ]; then
  missing=$("$PY" -c "import importlib.util as u, sys; print(' '.join(m for m in sys.argv[1:] if u.find_spec(m) is None))" \
    torch torchvision yaml deepspeed webdataset imagecodecs timm safetensors einops zarr anndata xformers) || missing=torch
fi
if [ "$DRY" != 1 ] && [ "$INSTALL" != never ] && { [ -n "$missing" ] || [ "$INSTALL" = pin ]; }; then
  echo "missing modules: ${missing:-none}"
  if ls "$PREP"/wheels/*.whl >/dev/null 2>&1; then
    # every carried wheel whose distribution is not installed, without dependency resolution (the image
    # holds numpy, h5py, pandas... that the wheels need; what is installed already is left as it is)
    todo=$("$PY" - "$PREP"/wheels/*.whl <<'EOF'
import importlib.metadata as m, sys
for f in sys.argv[1:]:
    name = f.rsplit("/", 1)[-1].split("-")[0]  # a wheel is DIST-VERSION-...; DIST spells "-" as "_"
    try:
        m.version(name)
    except m.PackageNotFoundError:
        print(f)
EOF
)
    what="from $PREP/wheels, offline: $(echo "$todo" | sed 's|.*/||; s|-[0-9].*||' | tr '\n' ' ')"
    if [ -n "$todo" ]; then
      # shellcheck disable=SC2086
      run_step install "$(limit INSTALL 90)" "$PY" -m pip install -q --no-index --no-deps --no-cache-dir $todo
    else
      what="nothing: every wheel in $PREP/wheels is installed already"
      echo "0 0 0" >"$OUT/install.rc"
    fi
  else
    torch_now=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null)
    if [ -z "$torch_now" ] || [ "$INSTALL" = pin ]; then torch_spec="torch==$TORCH_PIN torchvision==$TORCHVISION_PIN"
    else torch_spec="torch==$torch_now torchvision"; fi
    what="from the registry: $torch_spec -e .[dev], then --no-deps xformers"
    run_step install "$(limit INSTALL 300)" bash -c "\"\$0\" -m pip install -q --retries 1 --timeout 20 $torch_spec -e '.[dev]' &&
      \"\$0\" -m pip install -q --retries 1 --timeout 20 --no-deps xformers" "$PY"
  fi
  ok=$([ "$(cut -d' ' -f1 "$OUT/install.rc")" = 0 ] && echo true || echo false)
  printf '{"ran": true, "what": "%s", "ok": %s}\n' "$what" "$ok" >"$OUT/install.json"
fi

# ------------------------------------------------------------------------------------------- checks
HAS_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$DRY" != 1 ] && [ "$HAS_CUDA" != 1 ]; then
  echo "no CUDA device for $PY: running the CPU dry run instead (--dry-run)"
  DRY=1
fi
if [ "$DRY" = 1 ]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi
echo "gpu_check: python $PY, out $OUT, $([ "$DRY" = 1 ] && echo 'DRY RUN (CPU, tiny sizes)' || echo "GPU, budget ${BUDGET}s")"
run_step env "$(limit ENV 60)" "$PY" benchmarks/gpu_check.py env --json "$OUT/env.json"
run_step xformers "$(limit XFORMERS 60)" "$PY" benchmarks/gpu_check.py xformers --json "$OUT/xformers.json"

if [ "$DRY" = 1 ]; then
  run_step equivalence "$(limit EQUIVALENCE 120)" "$PY" benchmarks/attention.py --equivalence --device cpu \
    --heads 2 --head-dim 32 --lengths 17 90 1 40 --json "$OUT/equivalence.json"
  run_step attention "$(limit ATTENTION 120)" "$PY" benchmarks/attention.py --device cpu --batch 2 --heads 2 \
    --head-dim 32 --resolutions 55 --tiles 8 --backends sdpa --repeats 1 --no-memory --json "$OUT/attention.json"
  run_step train "$(limit TRAIN 300)" "$PY" benchmarks/gpu_train_check.py --allow-cpu \
    --config configs/train/tiny_cpu.yaml --steps 1 --warmup 0 --held 1 --batch 2 --workers 0 \
    ${GPU_CHECK_SHARDS:+--shards "$GPU_CHECK_SHARDS"} --json "$OUT/train.json" "data.collate.resolutions_um=[16.0]"
  run_step loader_cpu "$(limit LOADER_CPU 180)" "$PY" benchmarks/train_step.py --loader-only --decode-device cpu \
    --loader-samples "${GPU_CHECK_LOADER_SAMPLES:-16}" --loader-batch 8 --rounds 1
else
  run_step equivalence "$(limit EQUIVALENCE 90)" "$PY" benchmarks/attention.py --equivalence --device cuda \
    --heads 16 --head-dim 64 --lengths 197 3333 1 600 --json "$OUT/equivalence.json"
  run_step attention "$(limit ATTENTION 100)" "$PY" benchmarks/attention.py --device cuda --batch 32 --heads 16 \
    --head-dim 64 --resolutions 2 16 --backends xformers flex sdpa --repeats 10 --no-memory \
    --json "$OUT/attention.json"
  run_step train "$(limit TRAIN 150)" "$PY" benchmarks/gpu_train_check.py --steps 20 --warmup 5 --batch 32 \
    ${GPU_CHECK_SHARDS:+--shards "$GPU_CHECK_SHARDS"} --json "$OUT/train.json"
  # one round of 30 batches: the ≤ 2 batches the worker prefetches past the end weigh ≤ 7 %
  run_step loader_cuda "$(limit LOADER_CUDA 90)" "$PY" benchmarks/train_step.py --loader-only --decode-device cuda \
    --loader-samples "${GPU_CHECK_LOADER_SAMPLES:-960}" --loader-batch 32 --rounds 1
  run_step loader_cpu "$(limit LOADER_CPU 100)" "$PY" benchmarks/train_step.py --loader-only --decode-device cpu \
    --loader-samples "${GPU_CHECK_LOADER_SAMPLES:-960}" --loader-batch 32 --rounds 1
fi

# ------------------------------------------------------------------------------------------- table
echo
echo "gpu_check: $([ "$DRY" = 1 ] && echo 'DRY RUN on CPU — no GPU figure below is a measurement' || echo 'results'); files in $OUT"
report_py=$PY
"$report_py" -c "" 2>/dev/null || report_py=python3
"$report_py" benchmarks/gpu_check.py report "$OUT" --budget-s "$BUDGET" --elapsed-s $(($(date +%s) - T0)) \
  $([ "$DRY" = 1 ] && echo --dry-run)
