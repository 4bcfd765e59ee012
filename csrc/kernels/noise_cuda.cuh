// CUDA kernels for the noise model of noise.h: ΔW for many streams, and W + δ + ΔW of a range of
// the flat weight (a row tile) for a chunk of streams.
//
// Torch-free (raw pointers, cudaStream_t) so that check_compile.cu compile-checks them with plain
// nvcc; csrc/cuda/*.cu wrap them for ATen. Compile with --fmad=false: the normals must round like
// the CPU path (see the Box-Muller note in philox.h).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "noise.h"

namespace cimext {
namespace cuda {

// Storage type T <-> arithmetic type Acc. Each sum is rounded to T, as cimext/reference.py
// rounds when it adds tensors of the weight's dtype: (W + δ) first, then + T(ΔW).
template <typename T>
struct Num;
template <>
struct Num<float> {
  using Acc = float;
  static CIMEXT_HD Acc acc(float v) { return v; }
  static CIMEXT_HD float store(Acc v) { return v; }
};
template <>
struct Num<double> {
  using Acc = double;
  static CIMEXT_HD Acc acc(double v) { return v; }
  static CIMEXT_HD double store(Acc v) { return v; }
};
template <>
struct Num<__half> {
  using Acc = float;
  static CIMEXT_HD Acc acc(__half v) { return __half2float(v); }
  static CIMEXT_HD __half store(Acc v) { return __float2half_rn(v); }
};
template <>
struct Num<__nv_bfloat16> {
  using Acc = float;
  static CIMEXT_HD Acc acc(__nv_bfloat16 v) { return __bfloat162float(v); }
  static CIMEXT_HD __nv_bfloat16 store(Acc v) { return __float2bfloat16_rn(v); }
};

// Normals j0 .. j0 + D - 1 of a stream into eps, one randn4x per counter touched (noise_at calls
// it once per normal).
CIMEXT_HD void device_normals(uint64_t stream, uint64_t j0, int devices, float* eps) {
  int d = 0;
  uint64_t j = j0;
  while (d < devices) {
    const F32x4 r = randn4x(stream, j >> 2);
    for (uint32_t k = static_cast<uint32_t>(j & 3); k < 4 && d < devices; ++k, ++d, ++j)
      eps[d] = pick(r, k);
  }
}

// ΔW of elements 4g .. 4g+3 (those below n) of one stream, equal to noise_at for each. Gaussian
// and rcg noise use normal j = i, so one randn4x serves the whole group. w and mask are read only
// for device noise; a null mask means p.verify_all decides.
template <typename T>
CIMEXT_HD void noise_group(const NoiseParams& p, uint64_t stream, int64_t g, int64_t n,
                           const T* w, const uint8_t* mask, float dw[4]) {
  dw[0] = dw[1] = dw[2] = dw[3] = 0.0f;
  if (p.kind == kNoiseGaussian || p.kind == kNoiseRcg) {
    const F32x4 r = randn4x(stream, static_cast<uint64_t>(g));
    for (uint32_t k = 0; k < 4; ++k) {
      const float eps = pick(r, k);
      dw[k] = p.kind == kNoiseGaussian ? p.std_or_coef * eps : rcg_noise(p, eps);
    }
  } else if (p.kind == kNoiseDevice) {
    for (int k = 0; k < 4; ++k) {
      const int64_t i = 4 * g + k;
      if (i >= n) break;
      float eps[24];  // D = M / K <= 24
      device_normals(stream, static_cast<uint64_t>(i) * p.devices, p.devices, eps);
      const bool verified = mask != nullptr ? mask[i] != 0 : p.verify_all != 0;
      dw[k] = device_noise(p, static_cast<float>(Num<T>::acc(w[i])), verified, eps);
    }
  }
}

// Stream seeds of a launch: a device array, or one value when dev is null.
struct StreamSeeds {
  const uint64_t* dev;
  uint64_t value;
};

// NoiseParams (about 1 KiB) is a by-value kernel parameter; the device functions inline, so its
// reads stay in parameter space (ptxas -v: no local copy, only the 96-byte eps array).

// out[s * n + i] = ΔW_i of stream s. blockIdx.y walks the streams, x the groups of 4 elements.
template <typename T>
__global__ void noise_kernel(const NoiseParams p, StreamSeeds seeds, int64_t n_streams,
                             const T* __restrict__ w, const uint8_t* __restrict__ mask, int64_t n,
                             T* __restrict__ out) {
  const int64_t groups = (n + 3) / 4;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t s = blockIdx.y; s < n_streams; s += gridDim.y) {
    const uint64_t stream = seeds.dev != nullptr ? seeds.dev[s] : seeds.value;
    T* o = out + s * n;
    for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
         g += step) {
      float dw[4];
      noise_group(p, stream, g, n, w, mask, dw);
      for (int k = 0; k < 4 && 4 * g + k < n; ++k) o[4 * g + k] = Num<T>::store(dw[k]);
    }
  }
}

// Up to this many instances share one launch of perturbed_range_kernel: their stream seeds travel
// by value in the kernel parameters (no host-to-device copy, no sync).
constexpr int kMaxRangeStreams = 64;
struct RangeStreams {
  int64_t count;
  uint64_t seed[kMaxRangeStreams];
};

// Elements i0 .. i0 + n - 1 of the flat weight that counter group g (flat elements 4g .. 4g + 3)
// touches, for one stream: out[i - i0] = (W + δ) + ΔW rounded like cimext/reference.py, (W + δ)
// first, then + T(ΔW). w, delta and mask point at the full weight (delta and mask may be null).
template <typename T>
CIMEXT_HD void perturbed_range_group(const NoiseParams& p, uint64_t stream, int64_t g, int64_t i0,
                                     int64_t n, const T* w, const T* delta, const uint8_t* mask,
                                     T* out) {
  using N = Num<T>;
  float dw[4];
  // noise_group computes every lane of the group below i0 + n; lanes before i0 (at most 3 per
  // range) are dropped, so the counters, and so the noise, are those of the whole weight.
  noise_group(p, stream, g, i0 + n, w, mask, dw);
  for (int k = 0; k < 4; ++k) {
    const int64_t i = 4 * g + k;
    if (i < i0 || i >= i0 + n) continue;
    typename N::Acc base = N::acc(w[i]);
    if (delta != nullptr) base = N::acc(N::store(base + N::acc(delta[i])));
    out[i - i0] = N::store(base + N::acc(N::store(static_cast<typename N::Acc>(dw[k]))));
  }
}

// out[c * n + k] = W + δ + ΔW of flat element i0 + k for stream c of `streams` (k in [0, n)): a
// row tile of the weight for a chunk of instances, the scratch that one GEMM then reads.
// blockIdx.y walks the streams, x the counter groups of the range.
template <typename T>
__global__ void perturbed_range_kernel(const NoiseParams p, const RangeStreams streams,
                                       const T* __restrict__ w, const T* __restrict__ delta,
                                       const uint8_t* __restrict__ mask, int64_t i0, int64_t n,
                                       T* __restrict__ out) {
  const int64_t g0 = i0 / 4, groups = (i0 + n + 3) / 4 - g0;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t c = blockIdx.y; c < streams.count; c += gridDim.y) {
    const uint64_t stream = streams.seed[c];
    for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < groups;
         t += step)
      perturbed_range_group(p, stream, g0 + t, i0, n, w, delta, mask, out + c * n);
  }
}

constexpr int kThreads = 256;
// Grid-stride loops make any grid correct; this cap only bounds the launch size.
constexpr int64_t kMaxBlocks = 65535;

inline dim3 grid_for(int64_t n, int64_t n_streams) {
  const int64_t groups = (n + 3) / 4;
  int64_t bx = (groups + kThreads - 1) / kThreads;
  bx = bx < kMaxBlocks ? bx : kMaxBlocks;
  const int64_t by = n_streams < kMaxBlocks ? n_streams : kMaxBlocks;
  return dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by));
}

// ΔW of n weights for n_streams stream seeds held on the device: out is (n_streams, n).
template <typename T>
cudaError_t launch_noise(const NoiseParams& p, const uint64_t* streams_dev, int64_t n_streams,
                         const T* w, const uint8_t* mask, int64_t n, T* out, cudaStream_t cs) {
  if (n <= 0 || n_streams <= 0) return cudaSuccess;
  noise_kernel<T><<<grid_for(n, n_streams), kThreads, 0, cs>>>(p, StreamSeeds{streams_dev, 0},
                                                                 n_streams, w, mask, n, out);
  return cudaGetLastError();
}

// ΔW of n weights for one stream seed passed by value.
template <typename T>
cudaError_t launch_noise(const NoiseParams& p, uint64_t stream, const T* w, const uint8_t* mask,
                         int64_t n, T* out, cudaStream_t cs) {
  if (n <= 0) return cudaSuccess;
  noise_kernel<T><<<grid_for(n, 1), kThreads, 0, cs>>>(p, StreamSeeds{nullptr, stream}, 1, w,
                                                         mask, n, out);
  return cudaGetLastError();
}

// out (streams.count, n) = W + δ + ΔW of flat elements i0 .. i0 + n - 1 for each stream
// (delta and mask may be null; w, delta and mask point at the whole weight).
template <typename T>
cudaError_t launch_perturbed_range(const NoiseParams& p, const RangeStreams& streams, const T* w,
                                   const T* delta, const uint8_t* mask, int64_t i0, int64_t n,
                                   T* out, cudaStream_t cs) {
  if (n <= 0 || streams.count <= 0) return cudaSuccess;
  if (streams.count > kMaxRangeStreams || i0 < 0) return cudaErrorInvalidValue;
  // +1 group: a range that starts inside a counter group spans one more.
  perturbed_range_kernel<T><<<grid_for(n + 4, streams.count), kThreads, 0, cs>>>(
      p, streams, w, delta, mask, i0, n, out);
  return cudaGetLastError();
}

// out = W + δ + ΔW(stream) for all n weights; delta and mask may be null.
template <typename T>
cudaError_t launch_perturbed_weight(const NoiseParams& p, uint64_t stream, const T* w,
                                    const T* delta, const uint8_t* mask, int64_t n, T* out,
                                    cudaStream_t cs) {
  RangeStreams one;
  one.count = 1;
  one.seed[0] = stream;
  return launch_perturbed_range(p, one, w, delta, mask, 0, n, out, cs);
}

}  // namespace cuda
}  // namespace cimext
