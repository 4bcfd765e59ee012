// cimext::perturbed_conv2d on CUDA: W + δ + ΔW(seed) is built in one bounded, reused scratch
// (perturbed_tiles.cuh) and handed to cuDNN (at::conv2d) tile by tile: whole weights for a chunk
// of instances when they are small (with a shared input the chunk's instances run as one
// convolution with their filters side by side), else tiles of output channels (whole groups).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "../kernels/noise.h"
#include "perturbed_tiles.cuh"

namespace cimext::cuda {

namespace {

at::Tensor perturbed_conv2d_cuda(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& delta, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                 bool x_stacked, const at::Tensor& seeds, int64_t layer_id,
                                 int64_t mode, std::optional<double> scale, int64_t weight_bits,
                                 int64_t bits_per_device, double sigma,
                                 at::ArrayRef<double> level_sigma, double verified_sigma,
                                 double th, bool verify,
                                 const std::optional<at::Tensor>& verify_mask) {
  // The ATen calls below are implementation details: keep autograd out of them.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const NoiseSpec spec = check_perturbed_conv2d(
      x, weight, bias, delta, stride, padding, dilation, groups, x_stacked, seeds, layer_id, mode,
      scale, weight_bits, bits_per_device, sigma, level_sigma, verified_sigma, th, verify,
      verify_mask);
  const int64_t S = static_cast<int64_t>(spec.seeds.size());

  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = weight.contiguous();
  const at::Tensor dl = delta.has_value() ? delta->contiguous() : at::Tensor();
  const int64_t out_c = w.size(0), in_g = w.size(1), out_g = out_c / groups;
  const int64_t row_elems = in_g * w.size(2) * w.size(3);
  // Row tiles cover whole groups (a tile of a grouped convolution is a convolution of the
  // matching input channels with `tile / out_g` groups).
  const TilePlan plan = plan_tiles(out_c, row_elems, S, groups == 1 ? 1 : out_g);
  at::Tensor buf = at::empty({plan.chunk * plan.tile_rows, in_g, w.size(2), w.size(3)},
                             w.options());
  std::vector<uint64_t> streams(S);
  for (int64_t s = 0; s < S; ++s) streams[s] = stream_seed(spec.seeds[s], spec.layer_id);
  at::Tensor y;
  // conv2d has no out= variant: results are copied into y, small next to the convolutions.
  auto store = [&](const at::Tensor& r, int64_t s, int64_t c0) {
    if (!y.defined()) {
      std::vector<int64_t> shape{S};
      shape.insert(shape.end(), r.sizes().begin(), r.sizes().end());
      shape[2] = out_c;
      y = at::empty(shape, r.options());
    }
    y.select(0, s).narrow(1, c0, r.size(1)).copy_(r);
  };
  if (w.numel() == 0) {
    // No weights, no noise: the plain convolution gives the (possibly empty) output.
    for (int64_t s = 0; s < S; ++s)
      store(at::conv2d(x_stacked ? x.select(0, s) : x, w, bias, stride, padding, dilation, groups),
            s, 0);
    return y;
  }
  for (int64_t s0 = 0; s0 < S; s0 += plan.chunk) {
    const int64_t cc = std::min(plan.chunk, S - s0);
    for (int64_t r0 = 0; r0 < out_c; r0 += plan.tile_rows) {
      const int64_t nr = std::min(plan.tile_rows, out_c - r0);
      at::Tensor tile = buf.narrow(0, 0, cc * nr);
      perturbed_range_cuda(spec.params, streams.data() + s0, cc, w, dl, spec.verify_mask,
                           r0 * row_elems, nr * row_elems, tile);
      if (cc > 1 && !x_stacked && groups == 1) {
        // One convolution for the chunk: its filters side by side as cc * out_c channels.
        const at::Tensor b = bias.has_value() ? bias->repeat({cc}) : at::Tensor();
        const at::Tensor r =
            at::conv2d(x, tile, b.defined() ? std::optional<at::Tensor>(b) : std::nullopt,
                       stride, padding, dilation, 1);
        const at::Tensor rs = r.view({r.size(0), cc, out_c, r.size(2), r.size(3)});
        for (int64_t c = 0; c < cc; ++c) store(rs.select(1, c), s0 + c, 0);
        continue;
      }
      for (int64_t c = 0; c < cc; ++c) {
        const at::Tensor wc = tile.narrow(0, c * nr, nr);
        at::Tensor xs = x_stacked ? x.select(0, s0 + c) : x;
        const int64_t ng = groups == 1 ? 1 : nr / out_g;
        if (groups > 1 && ng != groups) xs = xs.narrow(1, (r0 / out_g) * in_g, ng * in_g);
        const std::optional<at::Tensor> b =
            bias.has_value() ? std::optional<at::Tensor>(bias->narrow(0, r0, nr)) : std::nullopt;
        store(at::conv2d(xs, wc, b, stride, padding, dilation, ng), s0 + c, r0);
      }
    }
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(cimext, CUDA, m) { m.impl("perturbed_conv2d", &perturbed_conv2d_cuda); }

}  // namespace cimext::cuda
