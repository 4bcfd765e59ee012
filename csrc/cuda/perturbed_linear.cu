// cimext::perturbed_linear on CUDA: for each seed, W + δ + ΔW(seed) is built in one reused scratch
// weight by a fused kernel, then cuBLAS (at::linear) writes slice s of the output.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../cpu/noise_common.h"
#include "../kernels/noise.h"

namespace cimext::cuda {

// Defined in noise.cu. check_operands: device / dtype / shape checks of x, bias and delta against
// weight. perturbed_weight_cuda: out = w + delta + ΔW(stream) on the current stream, for
// contiguous w, delta (may be undefined), mask (may be undefined) and out of w's shape.
void check_operands(const char* what, const at::Tensor& x, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& delta);
void perturbed_weight_cuda(const NoiseParams& p, uint64_t stream, const at::Tensor& w,
                           const at::Tensor& delta, const at::Tensor& mask, at::Tensor& out);

namespace {

at::Tensor perturbed_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& delta, bool x_stacked,
                                 const at::Tensor& seeds, int64_t layer_id, int64_t mode,
                                 std::optional<double> scale, int64_t weight_bits,
                                 int64_t bits_per_device, double sigma,
                                 at::ArrayRef<double> level_sigma, double verified_sigma, double th,
                                 bool verify, const std::optional<at::Tensor>& verify_mask) {
  // The ATen calls below are implementation details: keep autograd out of them (at::linear_out
  // refuses inputs that require grad otherwise).
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  TORCH_CHECK(weight.dim() == 2, "perturbed_linear: weight must be 2-D (out, in), got shape ",
              weight.sizes());
  check_operands("perturbed_linear", x, weight, bias, delta);
  const cpu::NoiseSpec spec = cpu::make_spec("perturbed_linear", weight, seeds, layer_id, mode,
                                             scale, weight_bits, bits_per_device, sigma,
                                             level_sigma, verified_sigma, th, verify, verify_mask);
  const int64_t S = static_cast<int64_t>(spec.seeds.size());
  TORCH_CHECK(x.dim() >= (x_stacked ? 2 : 1), "perturbed_linear: x must have at least ",
              x_stacked ? 2 : 1, " dims, got shape ", x.sizes());
  TORCH_CHECK(x.size(-1) == weight.size(1), "perturbed_linear: x.shape[-1]=", x.size(-1),
              " must equal weight.shape[1]=", weight.size(1));
  if (x_stacked)
    TORCH_CHECK(x.size(0) == S, "perturbed_linear: with x_stacked, x.shape[0]=", x.size(0),
                " must equal the number of seeds ", S);

  const c10::cuda::CUDAGuard guard(weight.device());
  std::vector<int64_t> shape{S};  // (S, *batch_dims, out)
  shape.insert(shape.end(), x.sizes().begin() + (x_stacked ? 1 : 0), x.sizes().end() - 1);
  shape.push_back(weight.size(0));
  at::Tensor y = at::empty(shape, x.options());
  const at::Tensor w = weight.contiguous();
  const at::Tensor dl = delta.has_value() ? delta->contiguous() : at::Tensor();
  // One scratch weight for all instances: each launch is queued on the stream behind the previous
  // GEMM, so it cannot overwrite the weights that GEMM still reads.
  at::Tensor buf = at::empty_like(w);
  for (int64_t s = 0; s < S; ++s) {
    perturbed_weight_cuda(spec.params, stream_seed(spec.seeds[s], spec.layer_id), w, dl,
                          spec.verify_mask, buf);
    at::Tensor ys = y.select(0, s);
    at::linear_out(ys, x_stacked ? x.select(0, s) : x, buf, bias);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(cimext, CUDA, m) { m.impl("perturbed_linear", &perturbed_linear_cuda); }

}  // namespace cimext::cuda
