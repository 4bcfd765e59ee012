// CPU noise machinery shared by the noise / perturbed_linear / perturbed_conv2d kernels.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "../common/checks.h"  // NoiseSpec, make_spec: the checks of every backend
#include "../kernels/noise.h"

namespace cimext::cpu {

// Fills out[k] with normal j0 + k of the stream (Triton randn4x order), k in [0, n). Uses the
// widest SIMD path that the CPU supports and set_simd_level allows; all paths give bit-identical
// results.
void fill_normals(uint64_t stream, uint64_t j0, int64_t n, float* out);

constexpr int64_t kSimdScalar = 0, kSimdAvx2 = 1, kSimdAvx512 = 2;
// Caps the SIMD level of fill_normals (0 scalar, 1 AVX2, 2 AVX-512); returns the previous cap.
int64_t set_simd_level(int64_t level);
// The level fill_normals uses now: the cap, lowered to what this CPU supports.
int64_t simd_level();

// out[k] = (base ? w[i0+k] + delta[i0+k] : 0) + ΔW(i0 + k) for k in [0, n): a contiguous flat
// range of the weight. scalar_t is float or double; noise is float32 math.
template <typename scalar_t>
void perturb_range(const NoiseParams& p, uint64_t stream, const scalar_t* w, const scalar_t* delta,
                   const uint8_t* mask, bool add_base, int64_t i0, int64_t n, scalar_t* out);

}  // namespace cimext::cpu
