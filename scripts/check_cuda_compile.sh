#!/usr/bin/env bash
# Compile-checks the torch-free CUDA kernels (csrc/kernels/noise_cuda.cuh, via check_compile.cu)
# for nvcc's default architecture and for sm_90, then runs the host self-test that compares the
# kernels' grouped noise path with noise_at. Needs nvcc but no GPU and no CUDA build of torch.
# nvcc is taken from $NVCC, PATH or $CUDA_HOME/bin; without one it says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC="${NVCC:-$(command -v nvcc || true)}"
cuda_home="${CUDA_HOME:-/usr/local/cuda}"
if [[ -z "$NVCC" && -x "$cuda_home/bin/nvcc" ]]; then NVCC="$cuda_home/bin/nvcc"; fi
if [[ -z "$NVCC" ]]; then
  echo "check_cuda_compile: nvcc not found, skipped"
  exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
src=csrc/kernels/check_compile.cu
flags=(-std=c++17 -O3 --fmad=false)

"$NVCC" "${flags[@]}" -c "$src" -o "$tmp/default.o"
echo "check_cuda_compile: default arch OK"
"$NVCC" "${flags[@]}" -arch=sm_90 -c "$src" -o "$tmp/sm90.o"
echo "check_cuda_compile: sm_90 OK"
"$NVCC" "${flags[@]}" -DCIMEXT_HOST_SELFTEST "$src" -o "$tmp/selftest"
"$tmp/selftest"
echo "check_cuda_compile: OK ($("$NVCC" --version | grep -o 'release [0-9.]*'))"

# The torch-facing CUDA sources (csrc/cuda/*.cu) against this torch's ATen headers. A CPU-only
# torch wheel ships the c10/cuda headers but not one generated macros header, which
# C10_USING_CUSTOM_GENERATED_MACROS stands in for; this compiles, it does not link or run.
torch_inc="$(python -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))' 2>/dev/null || true)"
py_inc="$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null || true)"
if [[ -n "$torch_inc" && -f "$torch_inc/c10/cuda/CUDAGuard.h" ]]; then
  for f in csrc/cuda/*.cu; do
    "$NVCC" -std=c++20 -O0 --fmad=false -arch=sm_90 -DC10_USING_CUSTOM_GENERATED_MACROS \
      -I"$torch_inc" -I"$torch_inc/torch/csrc/api/include" -I"$py_inc" -c "$f" \
      -o "$tmp/op_$(basename "$f" .cu).o" 2> "$tmp/err" || { cat "$tmp/err"; exit 1; }
  done
  echo "check_cuda_compile: csrc/cuda/*.cu against torch headers OK"
  # Without a CUDA torch nothing links here; at least every cimext::cuda function one file uses
  # must be defined by one of them (a declaration left behind by a rename fails only at load).
  if command -v nm > /dev/null; then
    nm -C --defined-only "$tmp"/op_*.o | grep -o 'cimext::cuda::[A-Za-z_0-9:]*(' | sort -u > "$tmp/def"
    nm -C --undefined-only "$tmp"/op_*.o | grep -o 'cimext::cuda::[A-Za-z_0-9:]*(' | sort -u > "$tmp/use"
    missing="$(comm -23 "$tmp/use" "$tmp/def")"
    if [[ -n "$missing" ]]; then
      echo "check_cuda_compile: used but defined in no csrc/cuda file:"
      echo "$missing"
      exit 1
    fi
    echo "check_cuda_compile: every cimext::cuda function used in csrc/cuda is defined there"
  fi
else
  echo "check_cuda_compile: torch's c10/cuda headers not found, csrc/cuda/*.cu not checked"
fi
