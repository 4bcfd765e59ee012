// cimext::perturbed_linear on CPU. The output features are cut into row tiles of W of at most
// 16 MiB. For each (instance, tile) all threads build W + δ + ΔW(seed) for the tile in one
// reused buffer, then one multi-threaded GEMM writes the matching output columns. The buffer is
// bounded by the tile size whatever the layer size, and no perturbed weight is kept.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>

#include "noise_common.h"

namespace cimext::cpu {
namespace {

// Rows of W per tile: the weight is split evenly into tiles of at most 16 MiB of float32. Large
// tiles keep the GEMM as efficient as one call on the whole weight: every call packs x again, so
// (measured with bench/bench_linear_floor.py, 1 thread, process CPU time, x (256, 4608),
// W (512, 4608)) two 256-row tiles cost 1.29x clean F.linear where one 512-row tile costs 1.23x
// (the floor, clean GEMM + the normals alone, is 1.21x); 128-row tiles cost 1.33x.
// CIMEXT_LINEAR_TILE_ROWS overrides it (tuning).
int64_t tile_rows(int64_t out_features, int64_t in_features) {
  static const int64_t forced = [] {
    const char* env = std::getenv("CIMEXT_LINEAR_TILE_ROWS");
    return env ? std::atoll(env) : int64_t{0};
  }();
  if (forced > 0) return std::min(forced, out_features);
  constexpr int64_t kTileElements = int64_t{1} << 22;  // 16 MiB of float32
  const int64_t max_rows = std::max<int64_t>(16, kTileElements / std::max<int64_t>(1, in_features));
  const int64_t tiles = (out_features + max_rows - 1) / max_rows;
  return std::max<int64_t>(1, (out_features + tiles - 1) / tiles);
}

// The kernel after the checks. float16 / bfloat16 run in float32 (the noise is float32 math
// anyway) and the result is rounded once to the weight's dtype.
at::Tensor perturbed_linear_checked(const NoiseSpec& spec, const at::Tensor& x,
                                    const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias,
                                    const std::optional<at::Tensor>& delta, bool x_stacked) {
  if (weight.scalar_type() == at::kHalf || weight.scalar_type() == at::kBFloat16) {
    const auto f = [](const std::optional<at::Tensor>& t) -> std::optional<at::Tensor> {
      return t.has_value() ? std::optional<at::Tensor>(t->to(at::kFloat)) : std::nullopt;
    };
    return perturbed_linear_checked(spec, x.to(at::kFloat), weight.to(at::kFloat), f(bias),
                                    f(delta), x_stacked)
        .to(weight.scalar_type());
  }
  const int64_t S = static_cast<int64_t>(spec.seeds.size());
  const int64_t out_f = weight.size(0), in_f = weight.size(1);

  // Output shape (S, *batch_dims, out).
  std::vector<int64_t> shape{S};
  const auto xs = x.sizes();
  shape.insert(shape.end(), xs.begin() + (x_stacked ? 1 : 0), xs.end() - 1);
  shape.push_back(out_f);
  const at::Tensor xc = x.contiguous();
  int64_t B = 1;  // the batch: x's dims between the seed dim (if stacked) and the features
  for (int64_t d = x_stacked ? 1 : 0; d < x.dim() - 1; ++d) B *= x.size(d);
  at::Tensor y = at::empty({S, B, out_f}, x.options());
  if (B == 0 || out_f == 0) return y.view(shape);
  const at::Tensor x2 = xc.view({x_stacked ? S : 1, B, in_f});
  if (in_f == 0) {
    y.zero_();
    if (bias.has_value()) y.add_(*bias);
    return y.view(shape);
  }

  const at::Tensor w = weight.contiguous();
  const at::Tensor dl = delta.has_value() ? delta->contiguous() : at::Tensor();
  const uint8_t* mask = spec.verify_mask.defined()
                            ? reinterpret_cast<const uint8_t*>(spec.verify_mask.data_ptr())
                            : nullptr;
  const int64_t rows = tile_rows(out_f, in_f);
  at::Tensor buf = at::empty({rows, in_f}, w.options());
  constexpr int64_t kBlock = 8192;  // elements per noise task
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "perturbed_linear_cpu", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* dp = dl.defined() ? dl.data_ptr<scalar_t>() : nullptr;
    scalar_t* bp = buf.data_ptr<scalar_t>();
    for (int64_t s = 0; s < S; ++s) {
      const uint64_t stream = stream_seed(spec.seeds[s], spec.layer_id);
      const at::Tensor xs = x2.select(0, x_stacked ? s : 0);
      for (int64_t r0 = 0; r0 < out_f; r0 += rows) {
        const int64_t nr = std::min(rows, out_f - r0), n = nr * in_f;
        at::parallel_for(0, (n + kBlock - 1) / kBlock, 1, [&](int64_t begin, int64_t end) {
          for (int64_t b = begin; b < end; ++b) {
            const int64_t i0 = b * kBlock, len = std::min(kBlock, n - i0);
            perturb_range<scalar_t>(spec.params, stream, wp, dp, mask, true, r0 * in_f + i0, len,
                                    bp + i0);
          }
        });
        // y[s][:, r0:r0+nr] = b + x_s @ tile^T; the column slice is a strided view that BLAS
        // writes in place.
        at::Tensor ys = y.select(0, s).narrow(1, r0, nr);
        const at::Tensor tile_t = buf.narrow(0, 0, nr).t();
        if (bias.has_value()) {
          at::addmm_out(ys, bias->narrow(0, r0, nr), xs, tile_t);
        } else {
          at::mm_out(ys, xs, tile_t);
        }
      }
    }
  });
  return y.view(shape);
}

at::Tensor perturbed_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& delta, bool x_stacked,
                                const at::Tensor& seeds, int64_t layer_id, int64_t mode,
                                std::optional<double> scale, int64_t weight_bits,
                                int64_t bits_per_device, double sigma,
                                at::ArrayRef<double> level_sigma, double verified_sigma, double th,
                                bool verify, const std::optional<at::Tensor>& verify_mask) {
  // The ATen calls below are implementation details: keep autograd out of them.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const NoiseSpec spec = check_perturbed_linear(x, weight, bias, delta, x_stacked, seeds,
                                                layer_id, mode, scale, weight_bits,
                                                bits_per_device, sigma, level_sigma,
                                                verified_sigma, th, verify, verify_mask);
  return perturbed_linear_checked(spec, x, weight, bias, delta, x_stacked);
}

}  // namespace

TORCH_LIBRARY_IMPL(cimext, CPU, m) { m.impl("perturbed_linear", &perturbed_linear_cpu); }

}  // namespace cimext::cpu
