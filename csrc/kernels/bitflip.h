// Bit flips of raw tensor storage (noisy memory reads), shared by the CPU and CUDA kernels.
//
// Torch-free and header-only. cimext/reference.py (bitflip_) is the specification: the eligible
// bits of element i are stream positions i * m + r; segments of `seg_elems` elements each draw
// candidate positions one after the other, the gap to the next one geometric with parameter pmax,
// from the Philox block randint4x(stream, (segment << 32) | draw). A candidate flips when the
// thinning uniform is below p01 / pmax (bit 0) or p10 / pmax (bit 1). Cost: one Philox block and
// at most kBitflipMaxLevels double products per candidate, nothing per element.
#pragma once
#include <stdint.h>

#include "philox.h"

namespace cimext {

constexpr int kBitflipMaxLevels = 22;  // 2^22 - 1 > 65536 elements * 32 bits per segment
constexpr double kTwoM53 = 1.1102230246251565e-16;  // 2^-53

struct BitflipParams {
  uint64_t stream;     // Philox key: stream_seed(seed, layer_id)
  int64_t n;           // elements
  int64_t seg_elems;   // elements per segment
  int32_t m;           // eligible bits per element
  int32_t levels;      // entries of table
  uint8_t bitpos[32];  // eligible bit positions, ascending
  double table[kBitflipMaxLevels];  // q^(2^k), q = 1 - pmax
  double pmax;         // max(p01, p10): the candidate rate
  double r01, r10;     // acceptance thresholds p01 / pmax, p10 / pmax
  uint32_t exp_mask;   // nonzero: a flipped element whose exponent bits are all set becomes 0
};

// Fills everything but stream from (p01, p10, mask, width, n, zero_nonfinite); the same integer
// and double arithmetic as reference.bitflip_segment / bitflip_gap_table. Returns false when no
// bit can flip (pmax == 0, mask == 0 or n == 0): the call is then the identity.
inline bool make_bitflip_params(BitflipParams* p, double p01, double p10, uint32_t mask,
                                int width, int64_t n, uint32_t exp_mask) {
  const double pmax = p01 > p10 ? p01 : p10;
  p->n = n;
  p->m = 0;
  for (int b = 0; b < width; ++b)
    if ((mask >> b) & 1u) p->bitpos[p->m++] = static_cast<uint8_t>(b);
  if (pmax == 0.0 || p->m == 0 || n == 0) return false;
  int64_t e = 65536;
  while (e > 1 && static_cast<double>(e * p->m) * pmax > 64.0) e /= 2;
  p->seg_elems = e;
  p->levels = 0;
  double t = 1.0 - pmax;
  while (p->levels < kBitflipMaxLevels && t >= kTwoM53) {
    p->table[p->levels++] = t;
    t = t * t;
  }
  p->pmax = pmax;
  p->r01 = p01 / pmax;
  p->r10 = p10 / pmax;
  p->exp_mask = exp_mask;
  return true;
}

CIMEXT_HD int64_t bitflip_segments(const BitflipParams& p) {
  return (p.n + p.seg_elems - 1) / p.seg_elems;
}

// The largest g < 2^levels with q^g >= u (products taken from the top level down).
CIMEXT_HD int64_t bitflip_gap(const BitflipParams& p, double u) {
  double acc = 1.0;
  int64_t g = 0;
  for (int k = p.levels - 1; k >= 0; --k) {
    const double c = acc * p.table[k];
    if (c >= u) {
      acc = c;
      g += int64_t(1) << k;
    }
  }
  return g;
}

// Flips the bits of segment s of `data` (U: the unsigned integer of the element's width) and
// returns the number of flips. Segments touch disjoint elements, so they may run in parallel.
template <typename U>
CIMEXT_HD int64_t bitflip_segment(const BitflipParams& p, U* data, int64_t s) {
  const int64_t begin = s * p.seg_elems;
  const int64_t rest = p.n - begin;
  const int64_t len = (rest < p.seg_elems ? rest : p.seg_elems) * p.m;
  int64_t cur = 0, flips = 0, last = -1;
  for (uint64_t draw = 0;; ++draw) {
    const U32x4 r = randint4x(p.stream, (static_cast<uint64_t>(s) << 32) | draw);
    const uint64_t gap_bits = (static_cast<uint64_t>(r.x) << 21) | (r.y >> 11);
    const int64_t pos = cur + bitflip_gap(p, static_cast<double>(gap_bits + 1) * kTwoM53);
    if (pos >= len) break;
    cur = pos + 1;
    const int64_t e = begin + pos / p.m;
    const int b = p.bitpos[pos % p.m];
    const U x = data[e];
    const double v =
        static_cast<double>((static_cast<uint64_t>(r.z) << 21) | (r.w >> 11)) * kTwoM53;
    if (!(v < (((x >> b) & 1u) ? p.r10 : p.r01))) continue;
    // Zeroing waits until the element's last flip: flips of one element are consecutive.
    if (p.exp_mask && last >= 0 && last != e && (data[last] & p.exp_mask) == p.exp_mask)
      data[last] = 0;
    data[e] = static_cast<U>(x ^ (U(1) << b));
    last = e;
    ++flips;
  }
  if (p.exp_mask && last >= 0 && (data[last] & p.exp_mask) == p.exp_mask) data[last] = 0;
  return flips;
}

}  // namespace cimext
