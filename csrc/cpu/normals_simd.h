// Bulk standard normals in Triton randn4x order: a scalar path and AVX2 / AVX-512 paths that give
// bit-identical results (chosen at run time: the build has no -march flag). Torch-free so that the C++ tests and micro-benchmarks can use it.
#pragma once
#include <stdint.h>

#include <algorithm>

#include "../kernels/philox.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define CIMEXT_X86 1
#endif

namespace cimext::cpu {

inline void fill_normals_scalar(uint64_t stream, uint64_t j0, int64_t n, float* out) {
  int64_t k = 0;
  while (k < n) {
    const uint64_t j = j0 + static_cast<uint64_t>(k);
    const F32x4 v = randn4x(stream, j >> 2);
    for (uint32_t c = static_cast<uint32_t>(j & 3); c < 4 && k < n; ++c, ++k) out[k] = pick(v, c);
  }
}

#if defined(CIMEXT_X86)
#define CIMEXT_AVX2 __attribute__((target("avx2,fma")))

// hi and lo 32-bit halves of a * m for eight uint32 lanes (m broadcast).
CIMEXT_AVX2 inline __m256i mulhilo(__m256i a, __m256i m, __m256i* lo) {
  const __m256i pe = _mm256_mul_epu32(a, m);
  const __m256i po = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  *lo = _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
  return _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
}

CIMEXT_AVX2 inline __m256 to_uniform(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srai_epi32(x, 31));  // negative -> ~x
  return _mm256_mul_ps(_mm256_cvtepi32_ps(x), _mm256_set1_ps(kUniformScale));
}

#define FMA8(a, b, c) _mm256_fmadd_ps(a, b, c)
#define SET8(v) _mm256_set1_ps(v)

// Same operations, in the same order, as bm::log_pos: bit-identical to the scalar path.
CIMEXT_AVX2 inline __m256 log_pos8(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126)));
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007FFFFF)),
                                                 _mm256_set1_epi32(0x3F000000)));
  const __m256 lt = _mm256_cmp_ps(m, SET8(bm::kSqrtHalf), _CMP_LT_OQ);
  const __m256 one = SET8(1.0f);
  e = _mm256_sub_ps(e, _mm256_and_ps(lt, one));
  m = _mm256_sub_ps(_mm256_add_ps(m, _mm256_and_ps(lt, m)), one);
  const __m256 z = _mm256_mul_ps(m, m);
  __m256 p = SET8(bm::kLogP0);
  p = FMA8(p, m, SET8(bm::kLogP1));
  p = FMA8(p, m, SET8(bm::kLogP2));
  p = FMA8(p, m, SET8(bm::kLogP3));
  p = FMA8(p, m, SET8(bm::kLogP4));
  p = FMA8(p, m, SET8(bm::kLogP5));
  p = FMA8(p, m, SET8(bm::kLogP6));
  p = FMA8(p, m, SET8(bm::kLogP7));
  p = FMA8(p, m, SET8(bm::kLogP8));
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(m, z), p);
  y = FMA8(e, SET8(bm::kLn2Lo), y);
  y = FMA8(SET8(-0.5f), z, y);
  return FMA8(e, SET8(bm::kLn2Hi), _mm256_add_ps(m, y));
}

// Same operations as bm::sincos_pos.
CIMEXT_AVX2 inline void sincos_pos8(__m256 x, __m256* s, __m256* c) {
  __m256i j = _mm256_cvttps_epi32(_mm256_mul_ps(x, SET8(bm::kFourOverPi)));
  j = _mm256_add_epi32(j, _mm256_and_si256(j, _mm256_set1_epi32(1)));
  const __m256 y = _mm256_cvtepi32_ps(j);
  __m256 r = FMA8(y, SET8(-bm::kDP1), x);
  r = FMA8(y, SET8(-bm::kDP2), r);
  r = FMA8(y, SET8(-bm::kDP3), r);
  const __m256 z = _mm256_mul_ps(r, r);
  const __m256 ts = FMA8(FMA8(SET8(bm::kSinC0), z, SET8(bm::kSinC1)), z, SET8(bm::kSinC2));
  const __m256 ps = FMA8(_mm256_mul_ps(ts, z), r, r);
  const __m256 tc = FMA8(FMA8(SET8(bm::kCosC0), z, SET8(bm::kCosC1)), z, SET8(bm::kCosC2));
  const __m256 pc = FMA8(_mm256_mul_ps(tc, z), z, FMA8(SET8(-0.5f), z, SET8(1.0f)));
  const __m256i q = _mm256_and_si256(_mm256_srli_epi32(j, 1), _mm256_set1_epi32(3));
  const __m256 swap = _mm256_castsi256_ps(
      _mm256_cmpeq_epi32(_mm256_and_si256(q, _mm256_set1_epi32(1)), _mm256_set1_epi32(1)));
  const __m256 sv = _mm256_blendv_ps(ps, pc, swap);
  const __m256 cv = _mm256_blendv_ps(pc, ps, swap);
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  // sin is negated in quadrants 2, 3; cos in quadrants 1, 2 (bit 1 of q + 1).
  const __m256i sneg = _mm256_and_si256(_mm256_slli_epi32(q, 30), sign);
  const __m256i cneg = _mm256_and_si256(_mm256_slli_epi32(_mm256_add_epi32(q, _mm256_set1_epi32(1)), 30), sign);
  *s = _mm256_xor_ps(sv, _mm256_castsi256_ps(sneg));
  *c = _mm256_xor_ps(cv, _mm256_castsi256_ps(cneg));
}

CIMEXT_AVX2 inline void box_muller8(__m256 u1, __m256 u2, __m256* n1, __m256* n2) {
  u1 = _mm256_max_ps(u1, _mm256_set1_ps(kBoxMullerFloor));
  const __m256 th = _mm256_mul_ps(_mm256_set1_ps(kTwoPi), u2);
  const __m256 r = _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), log_pos8(u1)));
  __m256 s, c;
  sincos_pos8(th, &s, &c);
  *n1 = _mm256_mul_ps(r, c);
  *n2 = _mm256_mul_ps(r, s);
}

// Round keys of one stream, broadcast once per fill instead of once per round.
struct KeySchedule {
  __m256i k0[10], k1[10];
};

CIMEXT_AVX2 inline void make_keys(uint64_t stream, KeySchedule* ks) {
  uint32_t k0 = static_cast<uint32_t>(stream), k1 = static_cast<uint32_t>(stream >> 32);
  for (int r = 0; r < 10; ++r) {
    ks->k0[r] = _mm256_set1_epi32(static_cast<int>(k0));
    ks->k1[r] = _mm256_set1_epi32(static_cast<int>(k1));
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
}

CIMEXT_AVX2 inline void store_transposed(__m256 a, __m256 b, __m256 c, __m256 d, float* out) {
  // 4x8 transpose: lane l of (a, b, c, d) -> out[4l .. 4l+3].
  const __m256 t0 = _mm256_unpacklo_ps(a, b), t1 = _mm256_unpackhi_ps(a, b);
  const __m256 t2 = _mm256_unpacklo_ps(c, d), t3 = _mm256_unpackhi_ps(c, d);
  const __m256 v0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 v1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 v2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 v3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  _mm256_storeu_ps(out + 0, _mm256_permute2f128_ps(v0, v1, 0x20));
  _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(v2, v3, 0x20));
  _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(v0, v1, 0x31));
  _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(v2, v3, 0x31));
}

// The low 32-bit halves of the 64-bit lanes of a and b: a.l0 a.l1 b.l0 b.l1 | a.l2 a.l3 b.l2 b.l3.
CIMEXT_AVX2 inline __m256i pack(__m256i a, __m256i b) {
  return _mm256_castps_si256(_mm256_shuffle_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(b),
                                               _MM_SHUFFLE(2, 0, 2, 0)));
}

// Philox4x32-10 of counters base .. base + 7; words[w] holds output word w of the 8 counters.
//
// The rounds run in 64-bit lanes: each counter's 32-bit word sits in the low half of a lane, so
// one _mm256_mul_epu32 gives the whole 64-bit product (hi = product >> 32, lo = product) with no
// blending; the high halves carry garbage that mul_epu32 ignores and the final pack drops.
// Vector a holds counters {0, 1, 4, 5} and b {2, 3, 6, 7} so that packing restores the order.
// The counter words c1 (high offset word) and c2 = c3 = 0 are uniform across lanes, which makes
// the first round a single multiply per vector.
CIMEXT_AVX2 inline void philox8(const KeySchedule& ks, uint64_t base, __m256i* words) {
  const __m256i lo = _mm256_set1_epi64x(static_cast<int64_t>(static_cast<uint32_t>(base)));
  const __m256i a0 = _mm256_add_epi64(lo, _mm256_setr_epi64x(0, 1, 4, 5));
  const __m256i b0 = _mm256_add_epi64(lo, _mm256_setr_epi64x(2, 3, 6, 7));
  const __m256i hi = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(base >> 32)));
  const __m256i ma = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundA));
  const __m256i mb = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundB));
  // Round 1 with c2 = c3 = 0: c0' = c1 ^ k0, c2' = hi(A c0) ^ k1, c1' = 0, c3' = lo(A c0).
  __m256i pa = _mm256_mul_epu32(a0, ma), pb = _mm256_mul_epu32(b0, ma);
  __m256i a_0 = _mm256_xor_si256(hi, ks.k0[0]), b_0 = a_0;
  __m256i a_2 = _mm256_xor_si256(_mm256_srli_epi64(pa, 32), ks.k1[0]);
  __m256i b_2 = _mm256_xor_si256(_mm256_srli_epi64(pb, 32), ks.k1[0]);
  __m256i a_1 = _mm256_setzero_si256(), b_1 = a_1;
  __m256i a_3 = pa, b_3 = pb;
  for (int r = 1; r < 10; ++r) {
    const __m256i qa_b = _mm256_mul_epu32(a_2, mb), qb_b = _mm256_mul_epu32(b_2, mb);
    const __m256i qa_a = _mm256_mul_epu32(a_0, ma), qb_a = _mm256_mul_epu32(b_0, ma);
    a_0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(qa_b, 32), a_1), ks.k0[r]);
    b_0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(qb_b, 32), b_1), ks.k0[r]);
    a_2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(qa_a, 32), a_3), ks.k1[r]);
    b_2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(qb_a, 32), b_3), ks.k1[r]);
    a_1 = qa_b;
    b_1 = qb_b;
    a_3 = qa_a;
    b_3 = qb_a;
  }
  words[0] = pack(a_0, b_0);
  words[1] = pack(a_1, b_1);
  words[2] = pack(a_2, b_2);
  words[3] = pack(a_3, b_3);
}

// 32 * kGroups normals from counters base .. base + 8 * kGroups. All Philox groups run first,
// then all Box-Muller steps: each phase is a run of independent short chains that the
// out-of-order core overlaps, where one long Philox-then-Box-Muller chain would stall it.
constexpr int kGroups = 4;
CIMEXT_AVX2 inline void randn_block(const KeySchedule& ks, uint64_t base, float* out) {
  __m256i words[kGroups][4];
  for (int g = 0; g < kGroups; ++g) philox8(ks, base + 8 * g, words[g]);
  for (int g = 0; g < kGroups; ++g) {
    __m256 n0, n1, n2, n3;
    box_muller8(to_uniform(words[g][0]), to_uniform(words[g][1]), &n0, &n1);
    box_muller8(to_uniform(words[g][2]), to_uniform(words[g][3]), &n2, &n3);
    store_transposed(n0, n1, n2, n3, out + 32 * g);
  }
}

CIMEXT_AVX2 inline void fill_normals_avx2(uint64_t stream, uint64_t j0, int64_t n, float* out) {
  int64_t k = 0;
  // Head: up to the next multiple of 4 so that whole counters follow.
  const int64_t head = std::min<int64_t>(n, static_cast<int64_t>((4 - (j0 & 3)) & 3));
  if (head > 0) {
    fill_normals_scalar(stream, j0, head, out);
    k = head;
  }
  KeySchedule ks;
  make_keys(stream, &ks);
  constexpr int64_t kBlock = 32 * kGroups;
  while (n - k >= kBlock) {
    const uint64_t base = (j0 + static_cast<uint64_t>(k)) >> 2;
    if ((base & 0xFFFFFFFFull) > 0xFFFFFFFFull - 8 * kGroups) {  // low counter word would wrap
      fill_normals_scalar(stream, j0 + static_cast<uint64_t>(k), kBlock, out + k);
    } else {
      randn_block(ks, base, out + k);
    }
    k += kBlock;
  }
  if (k < n) fill_normals_scalar(stream, j0 + static_cast<uint64_t>(k), n - k, out + k);
}

// ---------------------------------------------------------------------------------------------
// AVX-512 path: 16 lanes, the same operations in the same order as the scalar path (bit-identical
// results). Beyond the width it saves instructions: one vpternlogd per three-way XOR in the
// Philox rounds, mask registers instead of and/blend pairs, and a permute that packs the 64-bit
// round lanes back into counter order in one step.
// ---------------------------------------------------------------------------------------------
// GCC 12 warns that the intrinsics' own _mm512_undefined_* operands are uninitialized (a false
// positive of its headers, fixed in GCC 13).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#define CIMEXT_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))
#define FMA16(a, b, c) _mm512_fmadd_ps(a, b, c)
#define SET16(v) _mm512_set1_ps(v)

CIMEXT_AVX512 inline __m512 to_uniform16(__m512i x) {
  x = _mm512_xor_si512(x, _mm512_srai_epi32(x, 31));  // negative -> ~x
  return _mm512_mul_ps(_mm512_cvtepi32_ps(x), _mm512_set1_ps(kUniformScale));
}

// Same operations, in the same order, as bm::log_pos.
CIMEXT_AVX512 inline __m512 log_pos16(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  __m512 e = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(bits, 23), _mm512_set1_epi32(126)));
  __m512 m = _mm512_castsi512_ps(_mm512_or_si512(_mm512_and_si512(bits, _mm512_set1_epi32(0x007FFFFF)),
                                                 _mm512_set1_epi32(0x3F000000)));
  const __mmask16 lt = _mm512_cmp_ps_mask(m, SET16(bm::kSqrtHalf), _CMP_LT_OQ);
  const __m512 one = SET16(1.0f);
  e = _mm512_mask_sub_ps(e, lt, e, one);
  m = _mm512_sub_ps(_mm512_mask_add_ps(m, lt, m, m), one);
  const __m512 z = _mm512_mul_ps(m, m);
  __m512 p = SET16(bm::kLogP0);
  p = FMA16(p, m, SET16(bm::kLogP1));
  p = FMA16(p, m, SET16(bm::kLogP2));
  p = FMA16(p, m, SET16(bm::kLogP3));
  p = FMA16(p, m, SET16(bm::kLogP4));
  p = FMA16(p, m, SET16(bm::kLogP5));
  p = FMA16(p, m, SET16(bm::kLogP6));
  p = FMA16(p, m, SET16(bm::kLogP7));
  p = FMA16(p, m, SET16(bm::kLogP8));
  __m512 y = _mm512_mul_ps(_mm512_mul_ps(m, z), p);
  y = FMA16(e, SET16(bm::kLn2Lo), y);
  y = FMA16(SET16(-0.5f), z, y);
  return FMA16(e, SET16(bm::kLn2Hi), _mm512_add_ps(m, y));
}

// Same operations as bm::sincos_pos.
CIMEXT_AVX512 inline void sincos_pos16(__m512 x, __m512* s, __m512* c) {
  __m512i j = _mm512_cvttps_epi32(_mm512_mul_ps(x, SET16(bm::kFourOverPi)));
  j = _mm512_add_epi32(j, _mm512_and_si512(j, _mm512_set1_epi32(1)));
  const __m512 y = _mm512_cvtepi32_ps(j);
  __m512 r = FMA16(y, SET16(-bm::kDP1), x);
  r = FMA16(y, SET16(-bm::kDP2), r);
  r = FMA16(y, SET16(-bm::kDP3), r);
  const __m512 z = _mm512_mul_ps(r, r);
  const __m512 ts = FMA16(FMA16(SET16(bm::kSinC0), z, SET16(bm::kSinC1)), z, SET16(bm::kSinC2));
  const __m512 ps = FMA16(_mm512_mul_ps(ts, z), r, r);
  const __m512 tc = FMA16(FMA16(SET16(bm::kCosC0), z, SET16(bm::kCosC1)), z, SET16(bm::kCosC2));
  const __m512 pc = FMA16(_mm512_mul_ps(tc, z), z, FMA16(SET16(-0.5f), z, SET16(1.0f)));
  const __m512i q = _mm512_and_si512(_mm512_srli_epi32(j, 1), _mm512_set1_epi32(3));
  const __mmask16 swap = _mm512_test_epi32_mask(q, _mm512_set1_epi32(1));
  const __m512 sv = _mm512_mask_blend_ps(swap, ps, pc);
  const __m512 cv = _mm512_mask_blend_ps(swap, pc, ps);
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  // sin is negated in quadrants 2, 3; cos in quadrants 1, 2 (bit 1 of q + 1).
  const __m512i sneg = _mm512_and_si512(_mm512_slli_epi32(q, 30), sign);
  const __m512i cneg = _mm512_and_si512(_mm512_slli_epi32(_mm512_add_epi32(q, _mm512_set1_epi32(1)), 30), sign);
  *s = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(sv), sneg));
  *c = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(cv), cneg));
}

CIMEXT_AVX512 inline void box_muller16(__m512 u1, __m512 u2, __m512* n1, __m512* n2) {
  u1 = _mm512_max_ps(u1, _mm512_set1_ps(kBoxMullerFloor));
  const __m512 th = _mm512_mul_ps(_mm512_set1_ps(kTwoPi), u2);
  const __m512 r = _mm512_sqrt_ps(_mm512_mul_ps(_mm512_set1_ps(-2.0f), log_pos16(u1)));
  __m512 s, c;
  sincos_pos16(th, &s, &c);
  *n1 = _mm512_mul_ps(r, c);
  *n2 = _mm512_mul_ps(r, s);
}

struct KeySchedule16 {
  __m512i k0[10], k1[10];
};

CIMEXT_AVX512 inline void make_keys16(uint64_t stream, KeySchedule16* ks) {
  uint32_t k0 = static_cast<uint32_t>(stream), k1 = static_cast<uint32_t>(stream >> 32);
  for (int r = 0; r < 10; ++r) {
    ks->k0[r] = _mm512_set1_epi32(static_cast<int>(k0));
    ks->k1[r] = _mm512_set1_epi32(static_cast<int>(k1));
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
}

// out[4l .. 4l+3] = lane l of (a, b, c, d), l in [0, 16): a 4x16 transpose in four stores.
CIMEXT_AVX512 inline void store_transposed16(__m512 a, __m512 b, __m512 c, __m512 d, float* out) {
  const __m512 t0 = _mm512_unpacklo_ps(a, b), t1 = _mm512_unpackhi_ps(a, b);
  const __m512 t2 = _mm512_unpacklo_ps(c, d), t3 = _mm512_unpackhi_ps(c, d);
  // Within each 128-bit lane L: v_r holds counter 4L + r as (a, b, c, d).
  const __m512 v0 = _mm512_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m512 v1 = _mm512_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m512 v2 = _mm512_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m512 v3 = _mm512_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  // Then a 4x4 transpose of 128-bit lanes: output row L = lane L of v0, v1, v2, v3.
  const __m512 u0 = _mm512_shuffle_f32x4(v0, v1, _MM_SHUFFLE(1, 0, 1, 0));
  const __m512 u1 = _mm512_shuffle_f32x4(v2, v3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m512 u2 = _mm512_shuffle_f32x4(v0, v1, _MM_SHUFFLE(3, 2, 3, 2));
  const __m512 u3 = _mm512_shuffle_f32x4(v2, v3, _MM_SHUFFLE(3, 2, 3, 2));
  _mm512_storeu_ps(out + 0, _mm512_shuffle_f32x4(u0, u1, _MM_SHUFFLE(2, 0, 2, 0)));
  _mm512_storeu_ps(out + 16, _mm512_shuffle_f32x4(u0, u1, _MM_SHUFFLE(3, 1, 3, 1)));
  _mm512_storeu_ps(out + 32, _mm512_shuffle_f32x4(u2, u3, _MM_SHUFFLE(2, 0, 2, 0)));
  _mm512_storeu_ps(out + 48, _mm512_shuffle_f32x4(u2, u3, _MM_SHUFFLE(3, 1, 3, 1)));
}

// Philox4x32-10 of counters base .. base + 15 (low offset words must not wrap); words[w] holds
// output word w of the 16 counters in order. As in philox8, the rounds run in 64-bit lanes
// (a: counters 0-7, b: 8-15), and c1 = hi, c2 = c3 = 0 make the first round one multiply.
CIMEXT_AVX512 inline void philox16(const KeySchedule16& ks, uint64_t base, __m512i* words) {
  const __m512i lo = _mm512_set1_epi64(static_cast<int64_t>(static_cast<uint32_t>(base)));
  const __m512i a0 = _mm512_add_epi64(lo, _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7));
  const __m512i b0 = _mm512_add_epi64(lo, _mm512_setr_epi64(8, 9, 10, 11, 12, 13, 14, 15));
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(base >> 32)));
  const __m512i ma = _mm512_set1_epi32(static_cast<int>(kPhiloxRoundA));
  const __m512i mb = _mm512_set1_epi32(static_cast<int>(kPhiloxRoundB));
  __m512i pa = _mm512_mul_epu32(a0, ma), pb = _mm512_mul_epu32(b0, ma);
  __m512i a_0 = _mm512_xor_si512(hi, ks.k0[0]), b_0 = a_0;
  __m512i a_2 = _mm512_xor_si512(_mm512_srli_epi64(pa, 32), ks.k1[0]);
  __m512i b_2 = _mm512_xor_si512(_mm512_srli_epi64(pb, 32), ks.k1[0]);
  __m512i a_1 = _mm512_setzero_si512(), b_1 = a_1;
  __m512i a_3 = pa, b_3 = pb;
  for (int r = 1; r < 10; ++r) {
    const __m512i qa_b = _mm512_mul_epu32(a_2, mb), qb_b = _mm512_mul_epu32(b_2, mb);
    const __m512i qa_a = _mm512_mul_epu32(a_0, ma), qb_a = _mm512_mul_epu32(b_0, ma);
    // 0x96: three-way XOR.
    a_0 = _mm512_ternarylogic_epi32(_mm512_srli_epi64(qa_b, 32), a_1, ks.k0[r], 0x96);
    b_0 = _mm512_ternarylogic_epi32(_mm512_srli_epi64(qb_b, 32), b_1, ks.k0[r], 0x96);
    a_2 = _mm512_ternarylogic_epi32(_mm512_srli_epi64(qa_a, 32), a_3, ks.k1[r], 0x96);
    b_2 = _mm512_ternarylogic_epi32(_mm512_srli_epi64(qb_a, 32), b_3, ks.k1[r], 0x96);
    a_1 = qa_b;
    b_1 = qb_b;
    a_3 = qa_a;
    b_3 = qb_a;
  }
  // The low 32-bit halves of a's and then b's 64-bit lanes: counters 0 .. 15 in order.
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  words[0] = _mm512_permutex2var_epi32(a_0, even, b_0);
  words[1] = _mm512_permutex2var_epi32(a_1, even, b_1);
  words[2] = _mm512_permutex2var_epi32(a_2, even, b_2);
  words[3] = _mm512_permutex2var_epi32(a_3, even, b_3);
}

// 64 * kGroups16 normals from counters base .. base + 16 * kGroups16 (Philox phase, then
// Box-Muller phase, as randn_block).
constexpr int kGroups16 = 4;
CIMEXT_AVX512 inline void randn_block16(const KeySchedule16& ks, uint64_t base, float* out) {
  __m512i words[kGroups16][4];
  for (int g = 0; g < kGroups16; ++g) philox16(ks, base + 16 * g, words[g]);
  for (int g = 0; g < kGroups16; ++g) {
    __m512 n0, n1, n2, n3;
    box_muller16(to_uniform16(words[g][0]), to_uniform16(words[g][1]), &n0, &n1);
    box_muller16(to_uniform16(words[g][2]), to_uniform16(words[g][3]), &n2, &n3);
    store_transposed16(n0, n1, n2, n3, out + 64 * g);
  }
}

CIMEXT_AVX512 inline void fill_normals_avx512(uint64_t stream, uint64_t j0, int64_t n, float* out) {
  int64_t k = 0;
  const int64_t head = std::min<int64_t>(n, static_cast<int64_t>((4 - (j0 & 3)) & 3));
  if (head > 0) {
    fill_normals_scalar(stream, j0, head, out);
    k = head;
  }
  KeySchedule16 ks;
  make_keys16(stream, &ks);
  constexpr int64_t kBlock = 64 * kGroups16;
  while (n - k >= kBlock) {
    const uint64_t base = (j0 + static_cast<uint64_t>(k)) >> 2;
    if ((base & 0xFFFFFFFFull) > 0xFFFFFFFFull - 16 * kGroups16) {  // low counter word would wrap
      fill_normals_scalar(stream, j0 + static_cast<uint64_t>(k), kBlock, out + k);
    } else {
      randn_block16(ks, base, out + k);
    }
    k += kBlock;
  }
  // The tail (< kBlock normals) through the 8-lane path, then the scalar one.
  if (k < n) fill_normals_avx2(stream, j0 + static_cast<uint64_t>(k), n - k, out + k);
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif  // CIMEXT_X86

}  // namespace cimext::cpu
