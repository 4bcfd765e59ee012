// CUDA kernel of bitflip_: one thread per segment of the flip stream (csrc/kernels/bitflip.h),
// so the flips equal the CPU kernel's and the reference's bit for bit.
//
// Torch-free (raw pointers, cudaStream_t) so that check_compile.cu compile-checks it with plain
// nvcc; csrc/cuda/bitflip.cu wraps it for ATen. Segments touch disjoint elements: no atomics on
// the data, one atomicAdd per block for the flip count.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include "bitflip.h"

namespace cimext {
namespace cuda {

constexpr int kBitflipThreads = 128;

template <typename U>
__global__ void __launch_bounds__(kBitflipThreads)
    bitflip_kernel(const BitflipParams p, U* data, int64_t segments,
                   unsigned long long* flips) {
  __shared__ unsigned long long block_flips;
  if (threadIdx.x == 0) block_flips = 0;
  __syncthreads();
  const int64_t s = static_cast<int64_t>(blockIdx.x) * kBitflipThreads + threadIdx.x;
  if (s < segments) {
    const int64_t f = bitflip_segment<U>(p, data, s);
    if (f) atomicAdd(&block_flips, static_cast<unsigned long long>(f));
  }
  __syncthreads();
  if (threadIdx.x == 0 && block_flips) atomicAdd(flips, block_flips);
}

// Flips the bits of `data` (p.n elements of the unsigned type U of the element width, on the
// current device) in place and adds the number of flips to *flips (device memory, zeroed by the
// caller). p comes from make_bitflip_params plus the stream seed.
template <typename U>
cudaError_t launch_bitflip(const BitflipParams& p, U* data, unsigned long long* flips,
                           cudaStream_t cs) {
  const int64_t segments = bitflip_segments(p);
  if (segments == 0) return cudaSuccess;
  const int64_t blocks = (segments + kBitflipThreads - 1) / kBitflipThreads;
  bitflip_kernel<U><<<static_cast<unsigned>(blocks), kBitflipThreads, 0, cs>>>(p, data, segments,
                                                                               flips);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace cimext
