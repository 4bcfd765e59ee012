// The check-only ops cimext::_check_<op>: the checks of csrc/common/checks.cpp behind a schema,
// for the backends that are not C++ (the Triton launchers, the reference backend), which call
// them before anything else. Registered for every device (CompositeExplicitAutograd), they read
// no tensor data except max|weight| when no scale is given, which the noise ones return (a 0-dim
// float64 tensor) so that the caller does not compute it twice.
#include <torch/library.h>

#include "checks.h"

namespace cimext {
namespace {

// Whether t is being traced: a fake tensor (handled in Python) or one with symbolic sizes. The
// noise checks compare sizes and read max|weight|, which such tensors cannot do; while tracing
// they are skipped (the kernel that runs the traced graph checks everything then). Plain meta
// tensors are still checked (a meta tensor among CPU ones is a device mismatch to report).
bool tracing(const at::Tensor& t) {
  return t.defined() && (t.key_set().has(c10::DispatchKey::Python) ||
                         t.unsafeGetTensorImpl()->has_symbolic_sizes_strides());
}

bool tracing(const std::optional<at::Tensor>& t) { return t.has_value() && tracing(*t); }

at::Tensor traced_scale() {
  return at::empty({}, at::TensorOptions().dtype(at::kDouble).device(at::kMeta));
}

// The full scale as the check ops return it: a 0-dim float64 tensor, on the CPU (meta for a meta
// weight: fake tensors while tracing, where no value exists).
at::Tensor scale_tensor(const NoiseSpec& spec, const at::Tensor& weight) {
  const auto options = at::TensorOptions().dtype(at::kDouble);
  return at::scalar_tensor(spec.scale, weight.is_meta() ? options.device(at::kMeta) : options);
}

at::Tensor check_noise_op(const at::Tensor& weight, const at::Tensor& seeds, int64_t layer_id,
                      int64_t kind, std::optional<double> scale, int64_t weight_bits,
                      int64_t bits_per_device, double sigma, at::ArrayRef<double> level_sigma,
                      double verified_sigma, double th, bool verify,
                      const std::optional<at::Tensor>& verify_mask) {
  if (tracing(weight) || tracing(seeds) || tracing(verify_mask)) return traced_scale();
  check_weight("noise", weight);
  return scale_tensor(make_spec("noise", weight, seeds, layer_id, kind, scale, weight_bits,
                                bits_per_device, sigma, level_sigma, verified_sigma, th, verify,
                                verify_mask),
                      weight);
}

at::Tensor check_noise_out_op(const at::Tensor& weight, const at::Tensor& seeds, int64_t layer_id,
                          int64_t kind, std::optional<double> scale, int64_t weight_bits,
                          int64_t bits_per_device, double sigma,
                          at::ArrayRef<double> level_sigma, double verified_sigma, double th,
                          bool verify, const std::optional<at::Tensor>& verify_mask,
                          const at::Tensor& out) {
  if (tracing(weight) || tracing(seeds) || tracing(verify_mask) || tracing(out))
    return traced_scale();
  check_weight("noise", weight);
  const NoiseSpec spec = make_spec("noise", weight, seeds, layer_id, kind, scale, weight_bits,
                                   bits_per_device, sigma, level_sigma, verified_sigma, th,
                                   verify, verify_mask);
  check_noise_out(weight, static_cast<int64_t>(spec.seeds.size()), out);
  return scale_tensor(spec, weight);
}

at::Tensor check_perturbed_linear_op(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& delta, bool x_stacked,
                                 const at::Tensor& seeds, int64_t layer_id, int64_t kind,
                                 std::optional<double> scale, int64_t weight_bits,
                                 int64_t bits_per_device, double sigma,
                                 at::ArrayRef<double> level_sigma, double verified_sigma,
                                 double th, bool verify,
                                 const std::optional<at::Tensor>& verify_mask) {
  if (tracing(x) || tracing(weight) || tracing(bias) || tracing(delta) || tracing(seeds) ||
      tracing(verify_mask))
    return traced_scale();
  return scale_tensor(check_perturbed_linear(x, weight, bias, delta, x_stacked, seeds, layer_id,
                                            kind, scale, weight_bits, bits_per_device, sigma,
                                            level_sigma, verified_sigma, th, verify, verify_mask),
                      weight);
}

at::Tensor check_perturbed_conv2d_op(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& delta, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups, bool x_stacked, const at::Tensor& seeds,
                                 int64_t layer_id, int64_t kind, std::optional<double> scale,
                                 int64_t weight_bits, int64_t bits_per_device, double sigma,
                                 at::ArrayRef<double> level_sigma, double verified_sigma,
                                 double th, bool verify,
                                 const std::optional<at::Tensor>& verify_mask) {
  if (tracing(x) || tracing(weight) || tracing(bias) || tracing(delta) || tracing(seeds) ||
      tracing(verify_mask))
    return traced_scale();
  return scale_tensor(
      check_perturbed_conv2d(x, weight, bias, delta, stride, padding, dilation, groups, x_stacked,
                             seeds, layer_id, kind, scale, weight_bits, bits_per_device, sigma,
                             level_sigma, verified_sigma, th, verify, verify_mask),
      weight);
}

void check_sign_step_op(at::TensorList deltas, at::TensorList grads, double eta,
                        at::ArrayRef<double> bounds, const BoundTensors& bound_tensors) {
  check_sign_step(deltas, grads, eta, bounds, bound_tensors);
}

void check_bitflip_op(const at::Tensor& t, double p01, double p10, int64_t mask, int64_t seed,
                      int64_t layer_id, bool zero_nonfinite, bool in_place) {
  (void)seed;  // every int64 is a valid seed bit pattern
  check_bitflip(t, p01, p10, mask, layer_id, zero_nonfinite, in_place, nullptr);
}

}  // namespace

TORCH_LIBRARY_IMPL(cimext, CompositeExplicitAutograd, m) {
  m.impl("_check_noise", &check_noise_op);
  m.impl("_check_noise_out", &check_noise_out_op);
  m.impl("_check_perturbed_linear", &check_perturbed_linear_op);
  m.impl("_check_perturbed_conv2d", &check_perturbed_conv2d_op);
  m.impl("_check_sign_step_", &check_sign_step_op);
  m.impl("_check_bitflip", &check_bitflip_op);
}

}  // namespace cimext
