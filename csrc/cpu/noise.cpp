// cimext::noise on CPU: ΔW of a weight for every seed, shape (S, *weight.shape).
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include "noise_common.h"

namespace cimext::cpu {
namespace {

// Writes ΔW for every seed into `out`, a contiguous (S, *weight.shape) tensor of weight's dtype.
void noise_into(const NoiseSpec& spec, const at::Tensor& weight, at::Tensor& out) {
  if (weight.scalar_type() == at::kHalf || weight.scalar_type() == at::kBFloat16) {
    // float16 / bfloat16: the noise is float32 math on the float32 weight (as in the
    // reference), rounded to the weight's dtype once at the end.
    at::Tensor tmp = at::empty(out.sizes(), out.options().dtype(at::kFloat));
    noise_into(spec, weight.to(at::kFloat), tmp);
    out.copy_(tmp);
    return;
  }
  const at::Tensor w = weight.contiguous();
  const int64_t S = static_cast<int64_t>(spec.seeds.size()), n = w.numel();
  if (n == 0) return;
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
}

at::Tensor noise_cpu(const at::Tensor& weight, const at::Tensor& seeds, int64_t layer_id,
                     int64_t mode, std::optional<double> scale, int64_t weight_bits,
                     int64_t bits_per_device, double sigma, at::ArrayRef<double> level_sigma,
                     double verified_sigma, double th, bool verify,
                     const std::optional<at::Tensor>& verify_mask) {
  check_weight("noise", weight);
  const NoiseSpec spec = make_spec("noise", weight, seeds, layer_id, mode, scale, weight_bits,
                                   bits_per_device, sigma, level_sigma, verified_sigma, th, verify,
                                   verify_mask);
  std::vector<int64_t> shape{static_cast<int64_t>(spec.seeds.size())};
  shape.insert(shape.end(), weight.sizes().begin(), weight.sizes().end());
  at::Tensor out = at::empty(shape, weight.options());
  noise_into(spec, weight, out);
  return out;
}

void noise_out_cpu(const at::Tensor& weight, const at::Tensor& seeds, int64_t layer_id,
                   int64_t mode, std::optional<double> scale, int64_t weight_bits,
                   int64_t bits_per_device, double sigma, at::ArrayRef<double> level_sigma,
                   double verified_sigma, double th, bool verify,
                   const std::optional<at::Tensor>& verify_mask, at::Tensor out) {
  check_weight("noise", weight);
  const NoiseSpec spec = make_spec("noise", weight, seeds, layer_id, mode, scale, weight_bits,
                                   bits_per_device, sigma, level_sigma, verified_sigma, th, verify,
                                   verify_mask);
  check_noise_out(weight, static_cast<int64_t>(spec.seeds.size()), out);
  if (out.is_contiguous()) {
    noise_into(spec, weight, out);
  } else {
    // A strided out (a slice of a larger buffer) gets the values through one contiguous copy.
    at::Tensor tmp = at::empty(out.sizes(), out.options());
    noise_into(spec, weight, tmp);
    out.copy_(tmp);
  }
}

// Every backend: bump out's version counter, as ATen's out= ops do, so that autograd notices an
// overwritten tensor that was saved for backward.
void noise_out_ad_inplace_or_view(c10::DispatchKeySet keys, const at::Tensor& weight,
                                  const at::Tensor& seeds, int64_t layer_id, int64_t mode,
                                  std::optional<double> scale, int64_t weight_bits,
                                  int64_t bits_per_device, double sigma,
                                  at::ArrayRef<double> level_sigma, double verified_sigma,
                                  double th, bool verify,
                                  const std::optional<at::Tensor>& verify_mask, at::Tensor out) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("cimext::noise_out", "")
          .typed<void(const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                      std::optional<double>, int64_t, int64_t, double, at::ArrayRef<double>,
                      double, double, bool, const std::optional<at::Tensor>&, at::Tensor)>();
  // An inference tensor has no version counter (check_noise_out lets one through only inside
  // inference mode, where a normal weight still brings this kernel into the dispatch).
  const bool inference = out.is_inference();
  {
    at::AutoDispatchBelowADInplaceOrView below;
    op.redispatch(keys & c10::after_ADInplaceOrView_keyset, weight, seeds, layer_id, mode, scale,
                  weight_bits, bits_per_device, sigma, level_sigma, verified_sigma, th, verify,
                  verify_mask, out);
  }
  if (!inference) torch::autograd::impl::bump_version(out);
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

TORCH_LIBRARY_IMPL(cimext, CPU, m) {
  m.impl("noise", &noise_cpu);
  m.impl("noise_out", &noise_out_cpu);
}

TORCH_LIBRARY_IMPL(cimext, ADInplaceOrView, m) {
  m.impl("noise_out", TORCH_FN(noise_out_ad_inplace_or_view));
}

TORCH_LIBRARY_IMPL(cimext, CompositeExplicitAutograd, m) {
  m.impl("_set_cpu_simd", &set_cpu_simd);
  m.impl("_cpu_simd", &cpu_simd);
  m.impl("_philox_normals", &philox_normals);
  m.impl("_philox_uniforms", &philox_uniforms);
}

}  // namespace cimext::cpu
