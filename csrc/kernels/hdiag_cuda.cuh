// CUDA kernels of the Becker–LeCun curvature ops (hdiag_linear, hdiag_conv2d,
// curv_backward_linear, curv_backward_conv2d; DESIGN section 5).
//
// Torch-free (raw pointers, cudaStream_t) so that check_compile.cu compile-checks them with plain
// nvcc; csrc/cuda/hdiag.cu wraps them for ATen. The two linear ops are one tiled GEMM that squares
// its B operand as it loads a tile into shared memory (x² or W² never exists in global memory).
// The conv ops are direct: hdiag_conv2d reduces one weight element per block over (n, oh, ow) and
// curv_backward_conv2d gathers one input element per thread; both are deterministic (no atomics).
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace cimext {
namespace cuda {

constexpr int kSqTile = 16;

// C[m, n] = Σ_k A(m, k) · B(k, n)², with A(m, k) = a[m·a_m + k·a_k], B(k, n) = b[k·b_k + n·b_n]
// and C row-major (M, N). One 16x16 tile of C per block, K in steps of 16 through shared memory.
template <typename T>
__global__ void sq_gemm_kernel(int64_t M, int64_t N, int64_t K, const T* __restrict__ a,
                               int64_t a_m, int64_t a_k, const T* __restrict__ b, int64_t b_k,
                               int64_t b_n, T* __restrict__ c) {
  __shared__ T as[kSqTile][kSqTile + 1];
  __shared__ T bs[kSqTile][kSqTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t row = static_cast<int64_t>(blockIdx.y) * kSqTile + ty;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kSqTile + tx;
  T acc = T(0);
  for (int64_t k0 = 0; k0 < K; k0 += kSqTile) {
    const int64_t ka = k0 + tx, kb = k0 + ty;
    as[ty][tx] = (row < M && ka < K) ? a[row * a_m + ka * a_k] : T(0);
    const T bv = (kb < K && col < N) ? b[kb * b_k + col * b_n] : T(0);
    bs[ty][tx] = bv * bv;
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kSqTile; ++k) acc += as[ty][k] * bs[k][tx];
    __syncthreads();
  }
  if (row < M && col < N) c[row * N + col] = acc;
}

template <typename T>
cudaError_t launch_sq_gemm(int64_t M, int64_t N, int64_t K, const T* a, int64_t a_m, int64_t a_k,
                           const T* b, int64_t b_k, int64_t b_n, T* c, cudaStream_t cs) {
  if (M == 0 || N == 0) return cudaSuccess;
  const dim3 block(kSqTile, kSqTile);
  const dim3 grid(static_cast<unsigned>((N + kSqTile - 1) / kSqTile),
                  static_cast<unsigned>((M + kSqTile - 1) / kSqTile));
  sq_gemm_kernel<T><<<grid, block, 0, cs>>>(M, N, K, a, a_m, a_k, b, b_k, b_n, c);
  return cudaGetLastError();
}

// hdiag_linear: h (out, in) = s_outᵀ (rows, out) · x² (rows, in); contiguous inputs.
template <typename T>
cudaError_t launch_hdiag_linear(const T* x, const T* s_out, int64_t rows, int64_t in, int64_t out,
                                T* h, cudaStream_t cs) {
  return launch_sq_gemm<T>(out, in, rows, s_out, 1, out, x, in, 1, h, cs);
}

// curv_backward_linear: s_in (rows, in) = s_out (rows, out) · W² (out, in); contiguous inputs.
template <typename T>
cudaError_t launch_curv_backward_linear(const T* s_out, const T* w, int64_t rows, int64_t out,
                                        int64_t in, T* s_in, cudaStream_t cs) {
  return launch_sq_gemm<T>(rows, in, out, s_out, out, 1, w, in, 1, s_in, cs);
}

// The geometry of one 2-D convolution, NCHW, weight (O, C/groups, KH, KW).
struct ConvGeom {
  int64_t N, C, H, W, O, OH, OW, KH, KW;
  int64_t sh, sw, ph, pw, dh, dw, groups;
};

constexpr int kHdiagConvThreads = 256;

// One block per weight element (o, c, i, j): Σ over n, oh, ow of s_out · x², block-reduced.
template <typename T>
__global__ void __launch_bounds__(kHdiagConvThreads)
    hdiag_conv2d_kernel(const ConvGeom g, const T* __restrict__ x, const T* __restrict__ s,
                        T* __restrict__ h) {
  __shared__ T partial[kHdiagConvThreads];
  const int64_t Cg = g.C / g.groups, Og = g.O / g.groups;
  const int64_t e = blockIdx.x;  // flat index into (O, Cg, KH, KW)
  const int64_t j = e % g.KW, i = (e / g.KW) % g.KH, cl = (e / (g.KW * g.KH)) % Cg;
  const int64_t o = e / (g.KW * g.KH * Cg);
  const int64_t c = (o / Og) * Cg + cl;
  const int64_t L = g.OH * g.OW, total = g.N * L;
  T acc = T(0);
  for (int64_t t = threadIdx.x; t < total; t += kHdiagConvThreads) {
    const int64_t n = t / L, p = t % L, oh = p / g.OW, ow = p % g.OW;
    const int64_t hh = oh * g.sh - g.ph + i * g.dh, ww = ow * g.sw - g.pw + j * g.dw;
    if (hh < 0 || hh >= g.H || ww < 0 || ww >= g.W) continue;
    const T xv = x[((n * g.C + c) * g.H + hh) * g.W + ww];
    acc += s[(n * g.O + o) * L + p] * xv * xv;
  }
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = kHdiagConvThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) h[e] = partial[0];
}

template <typename T>
cudaError_t launch_hdiag_conv2d(const ConvGeom& g, const T* x, const T* s_out, T* h,
                                cudaStream_t cs) {
  const int64_t n = g.O * (g.C / g.groups) * g.KH * g.KW;
  if (n == 0) return cudaSuccess;
  if (n > 0x7FFFFFFF) return cudaErrorInvalidConfiguration;
  hdiag_conv2d_kernel<T><<<static_cast<unsigned>(n), kHdiagConvThreads, 0, cs>>>(g, x, s_out, h);
  return cudaGetLastError();
}

constexpr int kCurvConvThreads = 256;

// One thread per input element (n, c, h, w): Σ over the output positions and output channels of
// its group that read it, s_out · W².
template <typename T>
__global__ void __launch_bounds__(kCurvConvThreads)
    curv_backward_conv2d_kernel(const ConvGeom g, const T* __restrict__ s,
                                const T* __restrict__ wt, T* __restrict__ out) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kCurvConvThreads + threadIdx.x;
  if (e >= g.N * g.C * g.H * g.W) return;
  const int64_t ww = e % g.W, hh = (e / g.W) % g.H, c = (e / (g.W * g.H)) % g.C;
  const int64_t n = e / (g.W * g.H * g.C);
  const int64_t Cg = g.C / g.groups, Og = g.O / g.groups, grp = c / Cg, cl = c % Cg;
  T acc = T(0);
  for (int64_t i = 0; i < g.KH; ++i) {
    const int64_t th = hh + g.ph - i * g.dh;
    if (th < 0 || th % g.sh) continue;
    const int64_t oh = th / g.sh;
    if (oh >= g.OH) continue;
    for (int64_t j = 0; j < g.KW; ++j) {
      const int64_t tw = ww + g.pw - j * g.dw;
      if (tw < 0 || tw % g.sw) continue;
      const int64_t ow = tw / g.sw;
      if (ow >= g.OW) continue;
      for (int64_t o = grp * Og; o < (grp + 1) * Og; ++o) {
        const T wv = wt[((o * Cg + cl) * g.KH + i) * g.KW + j];
        acc += s[((n * g.O + o) * g.OH + oh) * g.OW + ow] * wv * wv;
      }
    }
  }
  out[e] = acc;
}

template <typename T>
cudaError_t launch_curv_backward_conv2d(const ConvGeom& g, const T* s_out, const T* w, T* s_in,
                                        cudaStream_t cs) {
  const int64_t n = g.N * g.C * g.H * g.W;
  if (n == 0) return cudaSuccess;
  const int64_t blocks = (n + kCurvConvThreads - 1) / kCurvConvThreads;
  if (blocks > 0x7FFFFFFF) return cudaErrorInvalidConfiguration;
  curv_backward_conv2d_kernel<T>
      <<<static_cast<unsigned>(blocks), kCurvConvThreads, 0, cs>>>(g, s_out, w, s_in);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace cimext
