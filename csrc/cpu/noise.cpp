// cimext::noise on CPU: ΔW of a weight for every seed, shape (S, *weight.shape).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "noise_common.h"

namespace cimext::cpu {
namespace {

at::Tensor noise_cpu(const at::Tensor& weight, at::IntArrayRef seeds, int64_t layer_id,
                     int64_t mode, double scale, int64_t weight_bits, int64_t bits_per_device,
                     double sigma, at::ArrayRef<double> level_sigma, double verified_sigma,
                     double th, bool verify, const std::optional<at::Tensor>& verify_mask) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble,
              "noise: weight must be float32 or float64 on CPU, got ", weight.scalar_type());
  const NoiseSpec spec = make_spec("noise", weight, seeds, layer_id, mode, scale, weight_bits,
                                   bits_per_device, sigma, level_sigma, verified_sigma, th, verify,
                                   verify_mask);
  const at::Tensor w = weight.contiguous();
  const int64_t S = static_cast<int64_t>(spec.seeds.size()), n = w.numel();
  std::vector<int64_t> shape{S};
  shape.insert(shape.end(), weight.sizes().begin(), weight.sizes().end());
  at::Tensor out = at::empty(shape, weight.options());
  if (n == 0) return out;
  const uint8_t* mask = spec.verify_mask.defined()
                            ? reinterpret_cast<const uint8_t*>(spec.verify_mask.data_ptr())
                            : nullptr;
  constexpr int64_t kBlock = 16384;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "noise_cpu", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, S * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t s = t / blocks, b = t % blocks;
        const int64_t i0 = b * kBlock, len = std::min(kBlock, n - i0);
        const uint64_t stream = stream_seed(spec.seeds[s], spec.layer_id);
        perturb_range<scalar_t>(spec.params, stream, wp, nullptr, mask, false, i0, len,
                                op + s * n + i0);
      }
    });
  });
  return out;
}

int64_t set_cpu_simd(int64_t level) {
  TORCH_CHECK(level >= kSimdScalar && level <= kSimdAvx512,
              "_set_cpu_simd: level must be 0 (scalar), 1 (AVX2) or 2 (AVX-512), got ", level);
  return set_simd_level(level);
}

int64_t cpu_simd() { return simd_level(); }

at::Tensor philox_stream(int64_t stream, int64_t j0, int64_t n, bool normal) {
  TORCH_CHECK(n >= 0, "_philox: n must be >= 0, got ", n);
  at::Tensor out = at::empty({n}, at::kFloat);
  float* o = out.data_ptr<float>();
  const auto s = static_cast<uint64_t>(stream), j = static_cast<uint64_t>(j0);
  constexpr int64_t kBlock = 16384;
  at::parallel_for(0, (n + kBlock - 1) / kBlock, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t k0 = b * kBlock, len = std::min(kBlock, n - k0);
      if (normal) {
        fill_normals(s, j + static_cast<uint64_t>(k0), len, o + k0);
      } else {
        for (int64_t k = 0; k < len; ++k) o[k0 + k] = uniform_at(s, j + static_cast<uint64_t>(k0 + k));
      }
    }
  });
  return out;
}

at::Tensor philox_normals(int64_t stream, int64_t j0, int64_t n) {
  return philox_stream(stream, j0, n, true);
}
at::Tensor philox_uniforms(int64_t stream, int64_t j0, int64_t n) {
  return philox_stream(stream, j0, n, false);
}

}  // namespace

TORCH_LIBRARY_IMPL(cimext, CPU, m) { m.impl("noise", &noise_cpu); }

TORCH_LIBRARY_IMPL(cimext, CompositeExplicitAutograd, m) {
  m.impl("_set_cpu_simd", &set_cpu_simd);
  m.impl("_cpu_simd", &cpu_simd);
  m.impl("_philox_normals", &philox_normals);
  m.impl("_philox_uniforms", &philox_uniforms);
}

}  // namespace cimext::cpu
