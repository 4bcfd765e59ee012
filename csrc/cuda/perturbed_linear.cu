// cimext::perturbed_linear on CUDA: W + δ + ΔW(seed) is built tile by tile (rows of W, or whole
// small weights for a chunk of instances) in one bounded, reused scratch (perturbed_tiles.cuh),
// each tile followed by its cuBLAS call writing the matching output columns (or instances).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "../kernels/noise.h"
#include "perturbed_tiles.cuh"

namespace cimext::cuda {

namespace {

at::Tensor perturbed_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& delta, bool x_stacked,
                                 const at::Tensor& seeds, int64_t layer_id, int64_t mode,
                                 std::optional<double> scale, int64_t weight_bits,
                                 int64_t bits_per_device, double sigma,
                                 at::ArrayRef<double> level_sigma, double verified_sigma, double th,
                                 bool verify, const std::optional<at::Tensor>& verify_mask) {
  // The ATen calls below are implementation details: keep autograd out of them (the out= GEMMs
  // refuse inputs that require grad otherwise).
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const NoiseSpec spec = check_perturbed_linear(x, weight, bias, delta, x_stacked, seeds,
                                                layer_id, mode, scale, weight_bits,
                                                bits_per_device, sigma, level_sigma,
                                                verified_sigma, th, verify, verify_mask);
  const int64_t S = static_cast<int64_t>(spec.seeds.size());

  const c10::cuda::CUDAGuard guard(weight.device());
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  std::vector<int64_t> shape{S};  // (S, *batch_dims, out)
  shape.insert(shape.end(), x.sizes().begin() + (x_stacked ? 1 : 0), x.sizes().end() - 1);
  shape.push_back(out_f);
  const at::Tensor xc = x.contiguous();
  int64_t B = 1;  // the batch: x's dims between the seed dim (if stacked) and the features
  for (int64_t d = x_stacked ? 1 : 0; d < x.dim() - 1; ++d) B *= x.size(d);
  at::Tensor y = at::empty({S, B, out_f}, x.options());
  if (B == 0 || out_f == 0) return y.view(shape);
  if (in_f == 0) {
    y.zero_();
    if (bias.has_value()) y.add_(*bias);
    return y.view(shape);
  }
  const at::Tensor x2 = xc.view({x_stacked ? S : 1, B, in_f});
  const at::Tensor w = weight.contiguous();
  const at::Tensor dl = delta.has_value() ? delta->contiguous() : at::Tensor();
  const TilePlan plan = plan_tiles(out_f, in_f, S, 1);
  at::Tensor buf = at::empty({plan.chunk, plan.tile_rows, in_f}, w.options());
  std::vector<uint64_t> streams(S);
  for (int64_t s = 0; s < S; ++s) streams[s] = stream_seed(spec.seeds[s], spec.layer_id);
  for (int64_t s0 = 0; s0 < S; s0 += plan.chunk) {
    const int64_t cc = std::min(plan.chunk, S - s0);
    for (int64_t r0 = 0; r0 < out_f; r0 += plan.tile_rows) {
      const int64_t nr = std::min(plan.tile_rows, out_f - r0);
      // cc > 1 only with whole weights (nr == tile_rows), so the tile is contiguous.
      at::Tensor tile = buf.narrow(0, 0, cc).narrow(1, 0, nr);
      perturbed_range_cuda(spec.params, streams.data() + s0, cc, w, dl, spec.verify_mask,
                           r0 * in_f, nr * in_f, tile);
      if (cc == 1) {
        // y[s0][:, r0:r0+nr] = b + x_s @ tile^T; cuBLAS writes the strided column slice in place.
        at::Tensor ys = y.select(0, s0).narrow(1, r0, nr);
        const at::Tensor xs = x2.select(0, x_stacked ? s0 : 0);
        const at::Tensor tile_t = tile.select(0, 0).t();
        if (bias.has_value()) {
          at::addmm_out(ys, bias->narrow(0, r0, nr), xs, tile_t);
        } else {
          at::mm_out(ys, xs, tile_t);
        }
      } else {
        // A chunk of small weights: one batched GEMM for all its instances.
        at::Tensor yc = y.narrow(0, s0, cc);
        const at::Tensor xs = x_stacked ? x2.narrow(0, s0, cc) : x2.expand({cc, B, in_f});
        at::bmm_out(yc, xs, tile.transpose(1, 2));
        if (bias.has_value()) yc.add_(*bias);
      }
    }
  }
  return y.view(shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(cimext, CUDA, m) { m.impl("perturbed_linear", &perturbed_linear_cuda); }

}  // namespace cimext::cuda
