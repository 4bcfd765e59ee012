#!/usr/bin/env bash
# GPU check: on a machine with an NVIDIA GPU whose python3 already has a CUDA build of torch and
# Triton (no network needed), build the CUDA extension against that torch, run the CUDA tests and
# the Triton tests compiled for the GPU, then the GPU benchmark. Writes into OUTDIR:
#   gpu_check.log   everything this script printed
#   build.log       the full compiler output of the build
#   summary.json    one entry per step: status (ok / failed / timeout / skipped), rc, seconds
#   bench_gpu.json  the benchmark rows (bench/bench_gpu.py), rewritten after every case
# Every step runs under a time limit inside an overall budget (CIMEXT_GPU_CHECK_BUDGET seconds,
# default 450, under 8 minutes); a failing step is logged and the next one still runs. Exit
# status: 0 when every step passed, 1 otherwise. Usage: scripts/gpu_check.sh OUTDIR
#
# Environment:
#   PYTHON                   interpreter (default python3)
#   CIMEXT_GPU_CHECK_BUDGET  overall seconds (default 450)
#   CIMEXT_GPU_CHECK_DRY=1   a dry run on a machine without a GPU (tests this script): no
#                            install, the benchmark on the CPU with tiny shapes, a small test
#                            subset; CIMEXT_GPU_CHECK_FAIL / _HANG (comma lists of step names)
#                            make those steps fail / hang, to test that the rest still runs
set -uo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
OUT="$1"
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.." || exit 2
ROOT="$(pwd)"
PY="${PYTHON:-python3}"
DRY="${CIMEXT_GPU_CHECK_DRY:-0}"
BUDGET="${CIMEXT_GPU_CHECK_BUDGET:-450}"
LOG="$OUT/gpu_check.log"
: > "$LOG"
START=$SECONDS
STEPS=()
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1

say() { echo "$*" | tee -a "$LOG"; }

# Seconds left for a step that may take up to $1 while later steps keep $2 in reserve.
allot() {
  local want=$1 reserve=$2 left
  left=$((BUDGET - (SECONDS - START) - reserve))
  ((left < want)) && want=$left
  ((want < 5)) && want=5
  echo "$want"
}

in_list() { [[ ",$2," == *",$1,"* ]]; }

# step NAME MAX_SECONDS RESERVE_SECONDS COMMAND: runs COMMAND (a bash string) under a time limit,
# output to the log (and, for the build, to build.log), and records the outcome.
step() {
  local name=$1 max=$2 reserve=$3 cmd=$4 limit t0 rc status
  limit=$(allot "$max" "$reserve")
  if [[ "$DRY" == 1 ]] && in_list "$name" "${CIMEXT_GPU_CHECK_FAIL:-}"; then
    cmd="echo 'dry run: step $name made to fail'; exit 3"
  elif [[ "$DRY" == 1 ]] && in_list "$name" "${CIMEXT_GPU_CHECK_HANG:-}"; then
    cmd="echo 'dry run: step $name made to hang'; sleep 600"
    limit=2
  fi
  say ""
  say "== [$name] (limit ${limit}s, $((SECONDS - START))s elapsed)"
  say "\$ $cmd"
  t0=$SECONDS
  if [[ "$name" == build* ]]; then
    timeout -k 10 "$limit" bash -c "$cmd" > "$OUT/$name.log" 2>&1
    rc=$?
    tail -n 40 "$OUT/$name.log" | tee -a "$LOG"
    [[ "$name" == build ]] && mv "$OUT/$name.log" "$OUT/build.log"
    [[ "$name" != build ]] && cat "$OUT/$name.log" >> "$OUT/build.log" && rm -f "$OUT/$name.log"
  else
    timeout -k 10 "$limit" bash -c "$cmd" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
  fi
  if ((rc == 0)); then
    status=ok
  elif ((rc == 124 || rc == 137)); then
    status=timeout
  else
    status=failed
  fi
  say "== [$name] $status (rc $rc, $((SECONDS - t0))s)"
  STEPS+=("$name $status $rc $((SECONDS - t0))")
  [[ "$status" == ok ]]
}

skip() {
  say ""
  say "== [$1] skipped: $2"
  STEPS+=("$1 skipped - 0")
}

say "gpu_check: $(date -u +%FT%TZ) in $ROOT, output in $OUT, budget ${BUDGET}s, dry=$DRY"

# 1. What this machine is.
step env 30 420 "
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || echo 'no nvidia-smi'
  command -v nvcc > /dev/null && nvcc --version | tail -n 2 || echo 'no nvcc on PATH'
  echo \"nproc \$(nproc)\"
  $PY -c 'import sys, torch; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"gpu\", torch.cuda.is_available() and torch.cuda.get_device_name())'
  $PY -c 'import triton; print(\"triton\", triton.__version__)' || echo 'no triton'
"

# 2. Build the CUDA extension against this torch, nothing downloaded. If it fails, a CPU-only
# build keeps the Triton steps alive (they need the compiled op schemas).
if [[ "$DRY" == 1 ]]; then
  build_cmd="echo 'dry run: would run CIMEXT_CUDA=1 MAX_JOBS=\$(nproc) $PY -m pip install --no-build-isolation --no-deps --no-index -e .'; $PY -c 'import cimext._C'"
  cpu_build_cmd="echo 'dry run: would run CIMEXT_CUDA=0 $PY setup.py build_ext --inplace'"
else
  arch="$($PY -c 'import torch; c = torch.cuda.get_device_capability(); print(f"{c[0]}.{c[1]}")' 2> /dev/null || true)"
  build_cmd="export CIMEXT_CUDA=1 MAX_JOBS=\$(nproc) ${arch:+TORCH_CUDA_ARCH_LIST=$arch}; $PY -m pip install -v --no-build-isolation --no-deps --no-index -e . && $PY -c 'import torch, cimext; assert torch._C._dispatch_has_kernel_for_dispatch_key(\"cimext::perturbed_linear\", \"CUDA\"), \"no CUDA kernels registered\"; print(\"CUDA kernels registered\")'"
  cpu_build_cmd="CIMEXT_CUDA=0 MAX_JOBS=\$(nproc) $PY setup.py build_ext --inplace"
fi
built=1
if ! step build 240 180 "$build_cmd"; then
  step build-cpu-only 120 150 "$cpu_build_cmd" || built=0
fi

# The package maps cimext.triton_kernels to triton_kernels/ (pyproject.toml); runs from the
# repository root also find it through the git-ignored link that in-place checkouts use, made
# after the build so that the install sees the checkout as committed.
[[ -e cimext/triton_kernels ]] || ln -s ../triton_kernels cimext/triton_kernels

if ((built == 0)); then
  for s in test-cuda test-triton bench; do skip "$s" "no compiled extension (both builds failed)"; done
else
# Tests run in parallel processes where pytest-xdist is installed (Triton compiles on the CPU).
xdist=""
if [[ "$DRY" != 1 ]] && $PY -c 'import xdist' 2> /dev/null; then xdist="-n 8"; fi

# 3. The CUDA tests (CUDA kernels and compiled Triton against the CPU kernels and the reference).
# Autotuning is off in tests: one configuration per kernel variant keeps compile time down.
if [[ "$DRY" == 1 ]]; then
  step test-cuda 90 140 "CIMEXT_TRITON_AUTOTUNE=0 $PY -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py"
else
  step test-cuda 90 140 "CIMEXT_TRITON_AUTOTUNE=0 $PY -m pytest -q -rfE -m cuda -p no:cacheprovider $xdist tests/"
fi

# 4. The Triton kernel tests, compiled for the GPU (tests/test_triton_kernels.py puts its tensors
# on the GPU when there is one).
if [[ "$DRY" == 1 ]]; then
  step test-triton 120 100 "$PY -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py -k 'uniforms_bit_identical or prune'"
else
  step test-triton 120 100 "env -u TRITON_INTERPRET CIMEXT_TRITON_AUTOTUNE=0 $PY -m pytest -q -rfE -p no:cacheprovider $xdist tests/test_triton_kernels.py"
fi

# 5. The GPU benchmark; it stops starting cases 30 s before its limit and keeps its JSON current.
if [[ "$DRY" == 1 ]]; then
  bench_args="--device cpu --quick"
else
  bench_args=""
fi
limit=$(allot 200 5)
step bench 200 5 "$PY bench/bench_gpu.py $bench_args --budget $((limit > 40 ? limit - 30 : 10)) --json '$OUT/bench_gpu.json'"
fi

# Summary: a table on the terminal and summary.json.
say ""
say "== summary ($((SECONDS - START))s of ${BUDGET}s)"
failed=0
{
  echo "{"
  echo "  \"seconds\": $((SECONDS - START)),"
  echo "  \"dry_run\": $([[ "$DRY" == 1 ]] && echo true || echo false),"
  echo "  \"steps\": ["
  n=${#STEPS[@]}
  i=0
  for s in "${STEPS[@]}"; do
    read -r name status rc secs <<< "$s"
    i=$((i + 1))
    [[ "$rc" == - ]] && rc=null
    sep=","
    ((i == n)) && sep=""
    echo "    {\"step\": \"$name\", \"status\": \"$status\", \"rc\": $rc, \"seconds\": $secs}$sep"
  done
  echo "  ]"
  echo "}"
} > "$OUT/summary.json"
for s in "${STEPS[@]}"; do
  read -r name status rc secs <<< "$s"
  say "$(printf '  %-16s %-8s rc %-4s %4ss' "$name" "$status" "$rc" "$secs")"
  # A failed full build that the CPU-only build replaced still counts as a failure.
  [[ "$status" == ok || "$status" == skipped ]] || failed=1
done
if ((failed)); then
  say "gpu_check: FAILED (see $LOG)"
  exit 1
fi
say "gpu_check: all steps passed"
exit 0
