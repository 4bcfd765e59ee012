// CPU noise machinery shared by the noise / perturbed_linear / perturbed_conv2d kernels.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

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

// The noise arguments of every op schema, validated; `what` names the op in error messages.
struct NoiseSpec {
  NoiseParams params;
  std::vector<uint64_t> seeds;
  uint64_t layer_id;
  at::Tensor verify_mask;  // undefined, or uint8/bool contiguous with weight.numel() elements
};
// seeds: 1-D int64 tensor on the CPU or weight's device; scale: nullopt computes full_scale.
NoiseSpec make_spec(const char* what, const at::Tensor& weight, const at::Tensor& seeds,
                    int64_t layer_id, int64_t mode, std::optional<double> scale,
                    int64_t weight_bits,
                    int64_t bits_per_device, double sigma, at::ArrayRef<double> level_sigma,
                    double verified_sigma, double th, bool verify,
                    const std::optional<at::Tensor>& verify_mask);

// s_l = max|weight| rounded to float32 (0 for an empty weight), as reference.full_scale. On a
// CUDA weight this reads one number back to the host.
double full_scale(const at::Tensor& weight);

// Checks of noise_out's `out` against weight and the number of seeds (shape, dtype, device,
// no overlap with weight); every backend calls it before writing.
void check_noise_out(const at::Tensor& weight, int64_t n_seeds, const at::Tensor& out);

// out[k] = (base ? w[i0+k] + delta[i0+k] : 0) + ΔW(i0 + k) for k in [0, n): a contiguous flat
// range of the weight. scalar_t is float or double; noise is float32 math.
template <typename scalar_t>
void perturb_range(const NoiseParams& p, uint64_t stream, const scalar_t* w, const scalar_t* delta,
                   const uint8_t* mask, bool add_base, int64_t i0, int64_t n, scalar_t* out);

// Checks shared by the perturbed ops: CPU float tensors of one dtype, optional bias/delta shapes.
void check_operands(const char* what, const at::Tensor& x, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& delta);

}  // namespace cimext::cpu
