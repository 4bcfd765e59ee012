// CUDA kernel of sign_step_: d <- clamp(d - eta * sign(g), -b, b) over many tensors per launch,
// with b one number per tensor or one per element.
//
// Torch-free (raw pointers, cudaStream_t) so that check_compile.cu compile-checks it with plain
// nvcc; csrc/cuda/sign_step.cu wraps it for ATen. Up to kSignStepTensors tensors of one dtype go
// into a table passed by value, and the blocks of a launch are dealt out to them in chunks of
// kSignStepChunk elements: one launch serves a whole layer list of small tensors.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include "noise_cuda.cuh"  // Num<T>: storage <-> arithmetic type of float / double / half / bf16
#include "sign_step.h"

namespace cimext {
namespace cuda {

constexpr int kSignStepTensors = 32;
constexpr int kSignStepThreads = 256;
constexpr int64_t kSignStepChunk = 8 * kSignStepThreads;  // elements per block

// The tensors of one launch; first_block[t] is the first block of tensor t (ascending);
// bound_t[t] holds per-element bounds, or is nullptr when bound[t] holds for every element.
template <typename T>
struct SignStepTable {
  using Acc = typename Num<T>::Acc;
  T* delta[kSignStepTensors];
  const T* grad[kSignStepTensors];
  const T* bound_t[kSignStepTensors];
  int64_t n[kSignStepTensors];
  int64_t first_block[kSignStepTensors];
  Acc bound[kSignStepTensors];
  int count;
};

template <typename T>
__global__ void __launch_bounds__(kSignStepThreads)
    sign_step_kernel(const SignStepTable<T> table, typename Num<T>::Acc eta) {
  using N = Num<T>;
  const int64_t block = blockIdx.x;
  int t = 0;
  for (int k = 1; k < table.count; ++k) t = table.first_block[k] <= block ? k : t;
  const int64_t begin = (block - table.first_block[t]) * kSignStepChunk;
  const int64_t end = begin + kSignStepChunk < table.n[t] ? begin + kSignStepChunk : table.n[t];
  T* __restrict__ d = table.delta[t];
  const T* __restrict__ g = table.grad[t];
  const typename N::Acc b = table.bound[t];
  const T* __restrict__ bt = table.bound_t[t];
  if (bt == nullptr) {
    for (int64_t i = begin + threadIdx.x; i < end; i += kSignStepThreads)
      d[i] = N::store(sign_step(N::acc(d[i]), N::acc(g[i]), eta, b));
  } else {
    for (int64_t i = begin + threadIdx.x; i < end; i += kSignStepThreads)
      d[i] = N::store(sign_step(N::acc(d[i]), N::acc(g[i]), eta, N::acc(bt[i])));
  }
}

// deltas[i] <- clamp(deltas[i] - eta * sign(grads[i]), -b, b) for i < count: contiguous device
// arrays of n[i] elements each, on the current device; b is bound_tensors[i][j] per element when
// bound_tensors and bound_tensors[i] are non-null, else bounds[i]. eta and the bounds are rounded
// to the arithmetic type (float for float / half / bf16, double for double).
template <typename T>
cudaError_t launch_sign_step(T* const* deltas, const T* const* grads, const T* const* bound_tensors,
                             const int64_t* n, const double* bounds, int count, double eta,
                             cudaStream_t cs) {
  using Acc = typename Num<T>::Acc;
  SignStepTable<T> table;
  table.count = 0;
  int64_t blocks = 0;
  for (int i = 0; i < count; ++i) {
    if (n[i] > 0) {
      const int k = table.count++;
      table.delta[k] = deltas[i];
      table.grad[k] = grads[i];
      table.bound_t[k] = bound_tensors == nullptr ? nullptr : bound_tensors[i];
      table.n[k] = n[i];
      table.bound[k] = static_cast<Acc>(bounds[i]);
      table.first_block[k] = blocks;
      blocks += (n[i] + kSignStepChunk - 1) / kSignStepChunk;
    }
    // Launch when the table is full, at the end, or before the grid would outgrow its x limit.
    const bool next_fits = i + 1 < count && blocks + (n[i + 1] + kSignStepChunk - 1) /
                                                         kSignStepChunk <= 0x7FFFFFFF;
    if (table.count > 0 && (table.count == kSignStepTensors || !next_fits)) {
      sign_step_kernel<T><<<static_cast<unsigned>(blocks), kSignStepThreads, 0, cs>>>(
          table, static_cast<Acc>(eta));
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
      table.count = 0;
      blocks = 0;
    }
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace cimext
