// Compile check of the torch-free CUDA kernels: instantiates every launcher so that
// `nvcc -std=c++17 -c csrc/kernels/check_compile.cu` builds all of them without torch.
//
// With -DCIMEXT_HOST_SELFTEST it also becomes a host program that checks noise_group (the grouped
// normals the kernels use) against noise_at for every noise kind, and the sign_step element
// function on its edge cases (sign(0), NaN, the clamp); it needs no GPU.
#include "bitflip_cuda.cuh"
#include "hdiag_cuda.cuh"
#include "noise_cuda.cuh"
#include "sign_step_cuda.cuh"

namespace cimext {
namespace cuda {

#define CIMEXT_INSTANTIATE(T)                                                                     \
  template cudaError_t launch_noise<T>(const NoiseParams&, const uint64_t*, int64_t, const T*,    \
                                       const uint8_t*, int64_t, T*, cudaStream_t);                \
  template cudaError_t launch_noise<T>(const NoiseParams&, uint64_t, const T*, const uint8_t*,    \
                                       int64_t, T*, cudaStream_t);                                \
  template cudaError_t launch_perturbed_weight<T>(const NoiseParams&, uint64_t, const T*,         \
                                                  const T*, const uint8_t*, int64_t, T*,          \
                                                  cudaStream_t);                                  \
  template cudaError_t launch_perturbed_range<T>(const NoiseParams&, const RangeStreams&,         \
                                                 const T*, const T*, const uint8_t*, int64_t,     \
                                                 int64_t, T*, cudaStream_t);                      \
  template cudaError_t launch_sign_step<T>(T* const*, const T* const*, const T* const*,           \
                                           const int64_t*, const double*, int, double,            \
                                           cudaStream_t);

CIMEXT_INSTANTIATE(float)
CIMEXT_INSTANTIATE(double)
CIMEXT_INSTANTIATE(__half)
CIMEXT_INSTANTIATE(__nv_bfloat16)
#undef CIMEXT_INSTANTIATE

// The curvature ops (hdiag_cuda.cuh) take float32 and float64 only.
#define CIMEXT_INSTANTIATE_HDIAG(T)                                                               \
  template cudaError_t launch_hdiag_linear<T>(const T*, const T*, int64_t, int64_t, int64_t, T*,  \
                                              cudaStream_t);                                      \
  template cudaError_t launch_curv_backward_linear<T>(const T*, const T*, int64_t, int64_t,      \
                                                      int64_t, T*, cudaStream_t);                 \
  template cudaError_t launch_hdiag_conv2d<T>(const ConvGeom&, const T*, const T*, T*,           \
                                              cudaStream_t);                                      \
  template cudaError_t launch_curv_backward_conv2d<T>(const ConvGeom&, const T*, const T*, T*,   \
                                                      cudaStream_t);
CIMEXT_INSTANTIATE_HDIAG(float)
CIMEXT_INSTANTIATE_HDIAG(double)
#undef CIMEXT_INSTANTIATE_HDIAG

// bitflip works on raw storage: one launcher per element width.
template cudaError_t launch_bitflip<uint8_t>(const BitflipParams&, uint8_t*, unsigned long long*,
                                             cudaStream_t);
template cudaError_t launch_bitflip<uint16_t>(const BitflipParams&, uint16_t*,
                                              unsigned long long*, cudaStream_t);
template cudaError_t launch_bitflip<uint32_t>(const BitflipParams&, uint32_t*,
                                              unsigned long long*, cudaStream_t);

}  // namespace cuda
}  // namespace cimext

#ifdef CIMEXT_HOST_SELFTEST
#include <stdio.h>

int main() {
  using namespace cimext;
  const double level_sigma[4] = {0.5, 1.5, 1.5, 0.5};
  struct Case {
    const char* name;
    int mode, m, k;
    const double* ls;
    int n_ls;
    bool verify, mask;
  } cases[] = {
      {"gaussian", kNoiseGaussian, 8, 2, nullptr, 0, false, false},
      {"rcg", kNoiseRcg, 8, 2, nullptr, 0, false, false},
      {"device/level_sigma", kNoiseDevice, 8, 2, level_sigma, 4, false, false},
      {"device/verify", kNoiseDevice, 8, 2, nullptr, 0, true, false},
      {"device/mask M=9 K=1", kNoiseDevice, 9, 1, nullptr, 0, false, true},
      {"device/mask M=6 K=3", kNoiseDevice, 6, 3, nullptr, 0, false, true},
  };
  const int64_t n = 1003;  // not a multiple of 4: the last group is partial
  float w[n];
  uint8_t mask[n];
  for (int64_t i = 0; i < n; ++i) {
    w[i] = static_cast<float>((i * 37) % 201 - 100) / 100.0f;
    mask[i] = static_cast<uint8_t>(i % 3 == 0);
  }
  const uint64_t stream = stream_seed(12345u, 7u);
  int failures = 0;
  for (const Case& c : cases) {
    NoiseParams p;
    if (!make_noise_params(&p, c.mode, 1.0, c.m, c.k, 0.1, c.ls, c.n_ls, 0.01, 0.06, c.verify,
                           c.mask)) {
      printf("FAIL %s: make_noise_params rejected the spec\n", c.name);
      ++failures;
      continue;
    }
    for (int64_t g = 0; g < (n + 3) / 4; ++g) {
      float dw[4];
      cuda::noise_group(p, stream, g, n, w, c.mask ? mask : nullptr, dw);
      for (int k = 0; k < 4 && 4 * g + k < n; ++k) {
        const int64_t i = 4 * g + k;
        const bool verified = c.mask ? mask[i] != 0 : c.verify;
        const float want = noise_at(p, stream, static_cast<uint64_t>(i), w[i], verified);
        if (dw[k] != want) {
          printf("FAIL %s: element %lld: %.9g != noise_at %.9g\n", c.name,
                 static_cast<long long>(i), dw[k], want);
          ++failures;
          break;
        }
      }
    }
  }
  // perturbed_range_group: W + δ + ΔW over ranges that start and end inside counter groups (row
  // tiles of a weight whose row length is not a multiple of 4) equals the whole-weight values.
  {
    float delta[n], tile[n];
    for (int64_t i = 0; i < n; ++i) delta[i] = 0.001f * static_cast<float>(i % 7);
    const int64_t ranges[][2] = {{0, n}, {1, 6}, {5, 97}, {102, 3}, {998, 5}, {3, 1}};
    for (const Case& c : cases) {
      NoiseParams p;
      make_noise_params(&p, c.mode, 1.0, c.m, c.k, 0.1, c.ls, c.n_ls, 0.01, 0.06, c.verify, c.mask);
      for (const auto& r : ranges) {
        const int64_t i0 = r[0], len = r[1];
        for (int64_t g = i0 / 4; g < (i0 + len + 3) / 4; ++g)
          cuda::perturbed_range_group(p, stream, g, i0, len, w, delta, c.mask ? mask : nullptr,
                                      tile);
        for (int64_t k = 0; k < len; ++k) {
          const int64_t i = i0 + k;
          const bool verified = c.mask ? mask[i] != 0 : c.verify;
          const float want = (w[i] + delta[i]) +
                             noise_at(p, stream, static_cast<uint64_t>(i), w[i], verified);
          if (tile[k] != want) {
            printf("FAIL range %s [%lld, +%lld): element %lld: %.9g != %.9g\n", c.name,
                   static_cast<long long>(i0), static_cast<long long>(len),
                   static_cast<long long>(i), tile[k], want);
            ++failures;
            break;
          }
        }
      }
    }
  }
  const float nan = NAN;
  const struct {
    float d, g, eta, bound, want;
  } steps[] = {
      {0.5f, 2.0f, 0.125f, 1.0f, 0.375f},   {0.5f, -3.0f, 0.125f, 1.0f, 0.625f},
      {0.5f, 0.0f, 0.125f, 1.0f, 0.5f},     {0.5f, -0.0f, 0.125f, 1.0f, 0.5f},
      {0.5f, nan, 0.125f, 1.0f, 0.5f},      {0.9375f, -1.0f, 0.125f, 1.0f, 1.0f},
      {-0.9375f, 1.0f, 0.125f, 1.0f, -1.0f}, {2.0f, 0.0f, 0.0f, 0.5f, 0.5f},
      {-2.0f, 5.0f, 0.0f, 0.0f, 0.0f},
  };
  for (const auto& c : steps) {
    const float got = sign_step(c.d, c.g, c.eta, c.bound);
    if (got != c.want) {
      printf("FAIL sign_step(%g, %g, %g, %g) = %g, want %g\n", c.d, c.g, c.eta, c.bound, got,
             c.want);
      ++failures;
    }
  }
  if (!isnan(sign_step(nan, 1.0f, 0.125f, 1.0f))) {
    printf("FAIL sign_step: a NaN delta must stay NaN\n");
    ++failures;
  }
  printf(failures ? "host self-test FAILED\n" : "host self-test OK\n");
  return failures ? 1 : 0;
}
#endif
