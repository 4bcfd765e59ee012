// Vectorized Philox4x32-10 + Box-Muller and the noise-range kernels (see noise_common.h).
#include "noise_common.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <type_traits>

#include "normals_simd.h"

namespace cimext::cpu {
namespace {

// Requested level (see set_simd_level); the active one is capped by what the CPU supports.
std::atomic<int64_t> g_simd_level{kSimdAvx512};

int64_t cpu_simd_support() {
#if defined(CIMEXT_X86)
  // __builtin_cpu_supports also checks that the OS saves the vector state (XCR0).
  static const int64_t level = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return kSimdAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kSimdAvx2;
    return kSimdScalar;
  }();
  return level;
#else
  return kSimdScalar;
#endif
}

}  // namespace

int64_t set_simd_level(int64_t level) { return g_simd_level.exchange(level); }

int64_t simd_level() { return std::min(std::max<int64_t>(g_simd_level.load(), 0), cpu_simd_support()); }

void fill_normals(uint64_t stream, uint64_t j0, int64_t n, float* out) {
#if defined(CIMEXT_X86)
  switch (simd_level()) {
    case kSimdAvx512:
      return fill_normals_avx512(stream, j0, n, out);
    case kSimdAvx2:
      return fill_normals_avx2(stream, j0, n, out);
    default:
      break;
  }
#endif
  fill_normals_scalar(stream, j0, n, out);
}

namespace {
// out[k] = (base ? w + δ : 0) + f(noise[k]) in one pass over the chunk.
template <typename scalar_t, typename F>
inline void combine(const scalar_t* w, const scalar_t* delta, bool add_base, const float* noise,
                    int64_t len, scalar_t* o, F f) {
  if (!add_base) {
    for (int64_t k = 0; k < len; ++k) o[k] = static_cast<scalar_t>(f(noise[k]));
  } else if (delta) {
    for (int64_t k = 0; k < len; ++k) o[k] = (w[k] + delta[k]) + static_cast<scalar_t>(f(noise[k]));
  } else {
    for (int64_t k = 0; k < len; ++k) o[k] = w[k] + static_cast<scalar_t>(f(noise[k]));
  }
}
}  // namespace

template <typename scalar_t>
void perturb_range(const NoiseParams& p, uint64_t stream, const scalar_t* w, const scalar_t* delta,
                   const uint8_t* mask, bool add_base, int64_t i0, int64_t n, scalar_t* out) {
  constexpr int64_t kChunk = 1024;
  float eps[kChunk * 4];
  float* noise = eps;  // normals of the chunk; in device mode overwritten in place by ΔW
  std::vector<float> big;
  if (p.kind == kNoiseDevice && p.devices > 4) {
    big.resize(static_cast<size_t>(kChunk) * p.devices);
    noise = big.data();
  }
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t len = std::min(kChunk, n - c0);
    const int64_t i = i0 + c0;
    const scalar_t* wc = w + i;
    const scalar_t* dc = delta ? delta + i : nullptr;
    scalar_t* o = out + c0;
    switch (p.kind) {
      case kNoiseGaussian:
      case kNoiseRcg: {
        const float c = p.std_or_coef, th = p.th;
        const bool rcg = p.kind == kNoiseRcg;
        const auto f = [c, th, rcg](float e) { return c * (rcg ? std::min(e, th) : e); };
        if constexpr (std::is_same_v<scalar_t, float>) {
          // Generate straight into the output and finish in place: one pass fewer through
          // memory than going through the chunk buffer (measured ~25% on the noise op).
          fill_normals(stream, static_cast<uint64_t>(i), len, o);
          combine(wc, dc, add_base, o, len, o, f);
        } else {
          fill_normals(stream, static_cast<uint64_t>(i), len, noise);
          combine(wc, dc, add_base, noise, len, o, f);
        }
        break;
      }
      case kNoiseDevice: {
        const int64_t D = p.devices;
        fill_normals(stream, static_cast<uint64_t>(i) * D, len * D, noise);
        // In place: element k reads normals [k*D, k*D + D) and writes noise[k] <= k*D.
        for (int64_t k = 0; k < len; ++k) {
          const bool ver = mask ? mask[i + k] != 0 : p.verify_all != 0;
          noise[k] = device_noise(p, static_cast<float>(wc[k]), ver, noise + k * D);
        }
        combine(wc, dc, add_base, noise, len, o, [](float v) { return v; });
        break;
      }
      default:
        combine(wc, dc, add_base, noise, len, o, [](float) { return 0.0f; });
    }
  }
}

template void perturb_range<float>(const NoiseParams&, uint64_t, const float*, const float*,
                                   const uint8_t*, bool, int64_t, int64_t, float*);
template void perturb_range<double>(const NoiseParams&, uint64_t, const double*, const double*,
                                    const uint8_t*, bool, int64_t, int64_t, double*);

}  // namespace cimext::cpu
