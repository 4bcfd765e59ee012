// Unit tests of the torch-free kernel headers (philox.h, noise.h): plain C++, no torch, no Python.
// Run by ctest (CMakeLists.txt); prints every failed check and exits non-zero if any failed.
#include <math.h>
#include <stdint.h>
#include <stdio.h>

#include <string.h>

#include "noise.h"
#include "normals_simd.h"
#include "philox.h"

namespace {

int g_failures = 0;

#define CHECK(cond, ...)                                               \
  do {                                                                 \
    if (!(cond)) {                                                     \
      ++g_failures;                                                    \
      printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);           \
      printf(__VA_ARGS__);                                             \
      printf("\n");                                                    \
    }                                                                  \
  } while (0)

using namespace cimext;

void test_philox_known_answers() {
  // Random123's kat_vectors for philox4x32_10: the Triton rounds must be the reference Philox.
  struct Kat {
    U32x4 ctr;
    uint32_t k0, k1;
    U32x4 want;
  } kats[] = {
      {{0u, 0u, 0u, 0u}, 0u, 0u, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, 0xffffffffu, 0xffffffffu,
       {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
      {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, 0xa4093822u, 0x299f31d0u,
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
  };
  for (const Kat& k : kats) {
    const U32x4 got = philox4x32_10(k.ctr, k.k0, k.k1);
    CHECK(got.x == k.want.x && got.y == k.want.y && got.z == k.want.z && got.w == k.want.w,
          "ctr %08x.. key %08x %08x -> %08x %08x %08x %08x", k.ctr.x, k.k0, k.k1, got.x, got.y,
          got.z, got.w);
  }
  // randint4x: counter (offset_lo, offset_hi, 0, 0), key (seed_lo, seed_hi).
  const U32x4 a = randint4x(0xa4093822299f31d0ull, 0x85a308d3243f6a88ull);
  const U32x4 b = philox4x32_10({0x243f6a88u, 0x85a308d3u, 0u, 0u}, 0x299f31d0u, 0xa4093822u);
  CHECK(a.x == b.x && a.y == b.y && a.z == b.z && a.w == b.w, "randint4x word order");
}

void test_splitmix() {
  CHECK(splitmix64(0) == 0xe220a8397b1dcdafull, "splitmix64(0) = %016llx",
        static_cast<unsigned long long>(splitmix64(0)));
  CHECK(stream_seed(5, 9) == splitmix64(5 ^ splitmix64(9)), "stream_seed definition");
  CHECK(stream_seed(5, 9) != stream_seed(9, 5), "stream_seed must not be symmetric");
}

void test_uniforms() {
  // The extremes of the uint -> float map stay in [0, 1).
  const uint32_t edges[] = {0u, 1u, 0x7fffffffu, 0x80000000u, 0xffffffffu};
  for (uint32_t u : edges) {
    const float f = uint_to_uniform(u);
    CHECK(f >= 0.0f && f < 1.0f, "uint_to_uniform(%08x) = %.9g", u, f);
  }
  const int64_t n = 1000000;
  double sum = 0.0;
  int64_t bad = 0;
  for (int64_t j = 0; j < n; ++j) {
    const float u = uniform_at(0x1234567890abcdefull, static_cast<uint64_t>(j));
    bad += !(u >= 0.0f && u < 1.0f);
    sum += u;
  }
  CHECK(bad == 0, "%lld uniforms outside [0, 1)", static_cast<long long>(bad));
  const double se = sqrt(1.0 / 12.0 / n);
  CHECK(fabs(sum / n - 0.5) < 4 * se, "uniform mean %.6f", sum / n);
}

void test_normals() {
  const int64_t n = 1000000;
  double s1 = 0.0, s2 = 0.0;
  int64_t bad = 0;
  for (int64_t j = 0; j < n; ++j) {
    const float x = normal_at(stream_seed(42, 3), static_cast<uint64_t>(j));
    bad += !isfinite(x);
    s1 += x;
    s2 += static_cast<double>(x) * x;
  }
  const double mean = s1 / n, sd = sqrt(s2 / n - mean * mean);
  CHECK(bad == 0, "%lld non-finite normals", static_cast<long long>(bad));
  CHECK(fabs(mean) < 4.0 / sqrt(static_cast<double>(n)), "normal mean %.6f", mean);
  CHECK(fabs(sd - 1.0) < 4.0 / sqrt(2.0 * n), "normal std %.6f", sd);
  // normal_at(j) is lane j & 3 of counter j >> 2.
  const F32x4 v = randn4x(77, 5);
  CHECK(normal_at(77, 22) == v.z, "normal_at lane order");
}

// make_noise_params with the DeviceModel defaults (M=8, K=2, sigma 0.1, th 0.06).
bool params(NoiseParams* p, int mode, int m, int k, const double* ls, int n_ls, bool verify,
            bool mask) {
  return make_noise_params(p, mode, 2.0, m, k, 0.1, ls, n_ls, 0.01, 0.06, verify, mask);
}

void test_make_noise_params() {
  NoiseParams p;
  const double ls4[4] = {0.5, 1.5, 1.5, 0.5}, ls3[3] = {1.0, 1.0, 1.0};
  CHECK(params(&p, kNoiseDevice, 8, 2, nullptr, 0, false, false), "M=8 K=2 accepted");
  CHECK(!params(&p, kNoiseDevice, 8, 3, nullptr, 0, false, false), "K=3 does not divide M=8");
  CHECK(!params(&p, kNoiseDevice, 8, 0, nullptr, 0, false, false), "K=0 rejected");
  CHECK(!params(&p, kNoiseDevice, 25, 1, nullptr, 0, false, false), "M=25 rejected");
  CHECK(!params(&p, kNoiseDevice, 8, 2, ls3, 3, false, false), "level_sigma needs 2**K entries");
  CHECK(params(&p, kNoiseDevice, 8, 2, ls4, 4, false, false), "level_sigma of 4 accepted");
  CHECK(p.devices == 4, "D = %d", p.devices);
}

void test_kind_resolution() {
  NoiseParams p;
  const double ls4[4] = {0.5, 1.5, 1.5, 0.5};
  // Device noise without level sigma or verification is one Gaussian per weight.
  params(&p, kNoiseDevice, 8, 2, nullptr, 0, false, false);
  CHECK(p.kind == kNoiseGaussian, "plain device noise -> gaussian, got %d", p.kind);
  const double want = 2.0 * 0.1 * sqrt(1.0 + 16.0 + 256.0 + 4096.0) / 255.0;
  CHECK(p.std_or_coef == static_cast<float>(want), "fast-path std %.9g vs %.9g", p.std_or_coef,
        want);
  params(&p, kNoiseDevice, 8, 2, ls4, 4, false, false);
  CHECK(p.kind == kNoiseDevice, "level sigma keeps device noise");
  params(&p, kNoiseDevice, 8, 2, nullptr, 0, true, false);
  CHECK(p.kind == kNoiseDevice, "verify keeps device noise");
  params(&p, kNoiseDevice, 8, 2, nullptr, 0, false, true);
  CHECK(p.kind == kNoiseDevice, "a verify mask keeps device noise");
  params(&p, kNoiseGaussian, 8, 2, nullptr, 0, false, false);
  CHECK(p.kind == kNoiseGaussian && p.std_or_coef == static_cast<float>(2.0 * 0.1),
        "gaussian std = scale * sigma");
  params(&p, kNoiseRcg, 8, 2, nullptr, 0, false, false);
  CHECK(p.kind == kNoiseRcg, "rcg stays rcg");
  params(&p, kNoiseNone, 8, 2, nullptr, 0, false, false);
  CHECK(p.kind == kNoiseNone && noise_at(p, 1, 0, 0.5f, false) == 0.0f, "none gives 0");
}

void test_fast_path_matches_device_std() {
  // The per-device path (forced by a mask with nothing verified) and the fast path must have the
  // same std: the fast path is an exact rewrite of the sum of D independent Gaussians.
  NoiseParams fast, slow;
  params(&fast, kNoiseDevice, 8, 2, nullptr, 0, false, false);
  params(&slow, kNoiseDevice, 8, 2, nullptr, 0, false, true);
  const int64_t n = 200000;
  double s2 = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const float dw = noise_at(slow, 99, static_cast<uint64_t>(i), 0.3f, false);
    s2 += static_cast<double>(dw) * dw;
  }
  const double sd = sqrt(s2 / n);
  CHECK(fabs(sd / fast.std_or_coef - 1.0) < 4.0 / sqrt(2.0 * n), "per-device std %.6g vs %.6g",
        sd, fast.std_or_coef);
}

void test_rcg_censoring() {
  NoiseParams p;
  make_noise_params(&p, kNoiseRcg, 1.5, 8, 2, 0.2, nullptr, 0, 0.0, 0.5, false, false);
  const float cap = p.std_or_coef * p.th;
  int64_t above = 0, at_cap = 0;
  for (int64_t i = 0; i < 100000; ++i) {
    const float dw = noise_at(p, 7, static_cast<uint64_t>(i), 0.0f, false);
    above += dw > cap;
    at_cap += dw == cap;
  }
  CHECK(above == 0, "%lld rcg values above coef*th", static_cast<long long>(above));
  CHECK(at_cap > 20000, "censoring at th=0.5 should hit ~31%%, hit %lld",
        static_cast<long long>(at_cap));
}

void test_verified_bound() {
  // verified_sigma = th makes the clamp active often; |ΔW| <= th_g * s, th_g = th Σ 2^{dK}/(2^M-1).
  const double scale = 0.8, th = 0.2;
  NoiseParams p;
  make_noise_params(&p, kNoiseDevice, scale, 8, 2, 0.1, nullptr, 0, th, th, true, false);
  const double th_g = th * (1 + 4 + 16 + 64) / 255.0;
  const double bound = th_g * scale * (1 + 1e-6);  // float rounding of the sum
  double worst = 0.0;
  for (int64_t i = 0; i < 100000; ++i) {
    const float w = static_cast<float>((i % 101) - 50) / 50.0f * static_cast<float>(scale);
    const double dw = fabs(noise_at(p, 11, static_cast<uint64_t>(i), w, true));
    worst = dw > worst ? dw : worst;
  }
  CHECK(worst <= bound, "verified |dW| %.9g exceeds th_g * s = %.9g", worst, bound);
  CHECK(worst > 0.5 * bound, "verified |dW| never approaches the bound (%.9g)", worst);
}

}  // namespace

// The CPU generator's SIMD paths (csrc/cpu/normals_simd.h) against the scalar path, bit for bit,
// on whichever of them this processor runs: offsets inside a counter, lengths around the vector
// blocks, and a run across the wrap of the low counter word.
void test_simd_normals_bit_identical() {
#if defined(CIMEXT_X86)
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl");
  printf("simd normals: avx2 %s, avx512 %s\n", avx2 ? "tested" : "absent",
         avx512 ? "tested" : "absent");
  const uint64_t starts[] = {0, 1, 2, 3, 5, 4ull * 0xFFFFFFF0ull + 1, (1ull << 34) + 7};
  const int64_t lengths[] = {0, 1, 3, 17, 127, 128, 129, 255, 256, 257, 1000, 4099};
  static float a[4099], b[4099];
  for (uint64_t j0 : starts) {
    for (int64_t n : lengths) {
      cpu::fill_normals_scalar(0x9E3779B97F4A7C15ull, j0, n, a);
      if (avx2) {
        cpu::fill_normals_avx2(0x9E3779B97F4A7C15ull, j0, n, b);
        CHECK(memcmp(a, b, sizeof(float) * n) == 0, "avx2 j0=%llu n=%lld",
              (unsigned long long)j0, (long long)n);
      }
      if (avx512) {
        cpu::fill_normals_avx512(0x9E3779B97F4A7C15ull, j0, n, b);
        CHECK(memcmp(a, b, sizeof(float) * n) == 0, "avx512 j0=%llu n=%lld",
              (unsigned long long)j0, (long long)n);
      }
    }
  }
#endif
}

int main() {
  test_philox_known_answers();
  test_splitmix();
  test_uniforms();
  test_normals();
  test_make_noise_params();
  test_kind_resolution();
  test_fast_path_matches_device_std();
  test_rcg_censoring();
  test_verified_bound();
  test_simd_normals_bit_identical();
  if (g_failures) {
    printf("%d check(s) failed\n", g_failures);
    return 1;
  }
  printf("all kernel header tests passed\n");
  return 0;
}
