// cimext::perturbed_conv2d on CUDA: for each seed, W + δ + ΔW(seed) is built in one reused scratch
// weight by a fused kernel and handed to at::conv2d (cuDNN); conv weights are small next to their
// activations, so only the per-instance scratch weight is ever materialized.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../cpu/noise_common.h"
#include "../kernels/noise.h"

namespace cimext::cuda {

// Defined in noise.cu (see perturbed_linear.cu for what they do).
void check_operands(const char* what, const at::Tensor& x, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& delta);
void perturbed_weight_cuda(const NoiseParams& p, uint64_t stream, const at::Tensor& w,
                           const at::Tensor& delta, const at::Tensor& mask, at::Tensor& out);

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
  TORCH_CHECK(weight.dim() == 4,
              "perturbed_conv2d: weight must be 4-D (out, in/groups, kh, kw), got shape ",
              weight.sizes());
  check_operands("perturbed_conv2d", x, weight, bias, delta);
  TORCH_CHECK(groups >= 1, "perturbed_conv2d: groups must be >= 1, got ", groups);
  for (auto v : stride) TORCH_CHECK(v >= 1, "perturbed_conv2d: stride must be >= 1, got ", stride);
  for (auto v : padding)
    TORCH_CHECK(v >= 0, "perturbed_conv2d: padding must be >= 0, got ", padding);
  for (auto v : dilation)
    TORCH_CHECK(v >= 1, "perturbed_conv2d: dilation must be >= 1, got ", dilation);
  const cpu::NoiseSpec spec = cpu::make_spec("perturbed_conv2d", weight, seeds, layer_id, mode,
                                             scale, weight_bits, bits_per_device, sigma,
                                             level_sigma, verified_sigma, th, verify, verify_mask);
  const int64_t S = static_cast<int64_t>(spec.seeds.size());
  TORCH_CHECK(x.dim() == (x_stacked ? 5 : 4), "perturbed_conv2d: x must be ",
              x_stacked ? "5-D (S, N, C, H, W)" : "4-D (N, C, H, W)", ", got shape ", x.sizes());
  if (x_stacked)
    TORCH_CHECK(x.size(0) == S, "perturbed_conv2d: with x_stacked, x.shape[0]=", x.size(0),
                " must equal the number of seeds ", S);
  const int64_t cin = x.size(x_stacked ? 2 : 1);
  TORCH_CHECK(cin == weight.size(1) * groups, "perturbed_conv2d: x has ", cin,
              " channels but weight expects in/groups * groups = ", weight.size(1) * groups);
  TORCH_CHECK(weight.size(0) % groups == 0, "perturbed_conv2d: out channels ", weight.size(0),
              " must be divisible by groups ", groups);

  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = weight.contiguous();
  const at::Tensor dl = delta.has_value() ? delta->contiguous() : at::Tensor();
  // One scratch weight for all instances: stream order keeps each launch behind the previous
  // convolution that reads it.
  at::Tensor buf = at::empty_like(w);
  at::Tensor y;
  for (int64_t s = 0; s < S; ++s) {
    perturbed_weight_cuda(spec.params, stream_seed(spec.seeds[s], spec.layer_id), w, dl,
                          spec.verify_mask, buf);
    const at::Tensor ys =
        at::conv2d(x_stacked ? x.select(0, s) : x, buf, bias, stride, padding, dilation, groups);
    // conv2d has no out= variant; the copy is small next to the convolution.
    if (!y.defined()) {
      std::vector<int64_t> shape{S};
      shape.insert(shape.end(), ys.sizes().begin(), ys.sizes().end());
      y = at::empty(shape, ys.options());
    }
    y.select(0, s).copy_(ys);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(cimext, CUDA, m) { m.impl("perturbed_conv2d", &perturbed_conv2d_cuda); }

}  // namespace cimext::cuda
