// cimext::perturbed_conv2d on CPU. Conv weights are small next to their activations, so each
// instance's W + δ + ΔW(seed) is built (in parallel, in one reused scratch buffer) and handed to
// ATen's convolution (oneDNN); instances run one after another so only one buffer ever exists.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "noise_common.h"

namespace cimext::cpu {
namespace {

at::Tensor perturbed_conv2d_checked(const NoiseSpec& spec, const at::Tensor& x,
                                    const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias,
                                    const std::optional<at::Tensor>& delta,
                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, int64_t groups, bool x_stacked);

at::Tensor perturbed_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& delta, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                bool x_stacked, const at::Tensor& seeds, int64_t layer_id,
                                int64_t mode, std::optional<double> scale, int64_t weight_bits,
                                int64_t bits_per_device, double sigma,
                                at::ArrayRef<double> level_sigma, double verified_sigma, double th,
                                bool verify, const std::optional<at::Tensor>& verify_mask) {
  // The ATen calls below are implementation details: keep autograd out of them.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const NoiseSpec spec = check_perturbed_conv2d(
      x, weight, bias, delta, stride, padding, dilation, groups, x_stacked, seeds, layer_id, mode,
      scale, weight_bits, bits_per_device, sigma, level_sigma, verified_sigma, th, verify,
      verify_mask);
  if (weight.scalar_type() == at::kHalf || weight.scalar_type() == at::kBFloat16) {
    // float16 / bfloat16: W + δ + ΔW and the convolution in float32, rounded once at the end.
    const auto f = [](const std::optional<at::Tensor>& t) -> std::optional<at::Tensor> {
      return t.has_value() ? std::optional<at::Tensor>(t->to(at::kFloat)) : std::nullopt;
    };
    return perturbed_conv2d_checked(spec, x.to(at::kFloat), weight.to(at::kFloat), f(bias),
                                    f(delta), stride, padding, dilation, groups, x_stacked)
        .to(weight.scalar_type());
  }
  return perturbed_conv2d_checked(spec, x, weight, bias, delta, stride, padding, dilation,
                                  groups, x_stacked);
}

at::Tensor perturbed_conv2d_checked(const NoiseSpec& spec, const at::Tensor& x,
                                    const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias,
                                    const std::optional<at::Tensor>& delta,
                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, int64_t groups, bool x_stacked) {
  const int64_t S = static_cast<int64_t>(spec.seeds.size());
  const at::Tensor w = weight.contiguous();
  const at::Tensor dl = delta.has_value() ? delta->contiguous() : at::Tensor();
  const uint8_t* mask = spec.verify_mask.defined()
                            ? reinterpret_cast<const uint8_t*>(spec.verify_mask.data_ptr())
                            : nullptr;
  const int64_t n = w.numel();
  at::Tensor buf = at::empty_like(w);
  std::vector<at::Tensor> outs;
  outs.reserve(S);
  constexpr int64_t kBlock = 8192;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  for (int64_t s = 0; s < S; ++s) {
    const uint64_t stream = stream_seed(spec.seeds[s], spec.layer_id);
    AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "perturbed_conv2d_cpu", [&] {
      const scalar_t* wp = w.data_ptr<scalar_t>();
      const scalar_t* dp = dl.defined() ? dl.data_ptr<scalar_t>() : nullptr;
      scalar_t* bp = buf.data_ptr<scalar_t>();
      at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const int64_t i0 = b * kBlock, len = std::min(kBlock, n - i0);
          perturb_range<scalar_t>(spec.params, stream, wp, dp, mask, true, i0, len, bp + i0);
        }
      });
    });
    const at::Tensor xs = x_stacked ? x.select(0, s) : x;
    outs.push_back(at::conv2d(xs, buf, bias, stride, padding, dilation, groups));
  }
  if (S == 1) return outs[0].unsqueeze(0);
  return at::stack(outs);
}

}  // namespace

TORCH_LIBRARY_IMPL(cimext, CPU, m) { m.impl("perturbed_conv2d", &perturbed_conv2d_cpu); }

}  // namespace cimext::cpu
