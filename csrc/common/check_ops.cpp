// The check-only ops cimext::_check_<op>: the checks of csrc/common/checks.cpp behind a schema,
// for the backends that are not C++ (the Triton launchers, the reference backend), which call
// them before anything else. Registered for every device (CompositeExplicitAutograd), they read
// no tensor data except max|weight| when no scale is given, which the noise ops return so that
// the caller does not compute it twice.
#include <torch/library.h>

#include "checks.h"

namespace cimext {
namespace {

double check_noise_op(const at::Tensor& weight, const at::Tensor& seeds, int64_t layer_id,
                      int64_t kind, std::optional<double> scale, int64_t weight_bits,
                      int64_t bits_per_device, double sigma, at::ArrayRef<double> level_sigma,
                      double verified_sigma, double th, bool verify,
                      const std::optional<at::Tensor>& verify_mask) {
  check_weight("noise", weight);
  return make_spec("noise", weight, seeds, layer_id, kind, scale, weight_bits, bits_per_device,
                   sigma, level_sigma, verified_sigma, th, verify, verify_mask)
      .scale;
}

double check_noise_out_op(const at::Tensor& weight, const at::Tensor& seeds, int64_t layer_id,
                          int64_t kind, std::optional<double> scale, int64_t weight_bits,
                          int64_t bits_per_device, double sigma,
                          at::ArrayRef<double> level_sigma, double verified_sigma, double th,
                          bool verify, const std::optional<at::Tensor>& verify_mask,
                          const at::Tensor& out) {
  check_weight("noise", weight);
  const NoiseSpec spec = make_spec("noise", weight, seeds, layer_id, kind, scale, weight_bits,
                                   bits_per_device, sigma, level_sigma, verified_sigma, th,
                                   verify, verify_mask);
  check_noise_out(weight, static_cast<int64_t>(spec.seeds.size()), out);
  return spec.scale;
}

double check_perturbed_linear_op(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& delta, bool x_stacked,
                                 const at::Tensor& seeds, int64_t layer_id, int64_t kind,
                                 std::optional<double> scale, int64_t weight_bits,
                                 int64_t bits_per_device, double sigma,
                                 at::ArrayRef<double> level_sigma, double verified_sigma,
                                 double th, bool verify,
                                 const std::optional<at::Tensor>& verify_mask) {
  return check_perturbed_linear(x, weight, bias, delta, x_stacked, seeds, layer_id, kind, scale,
                                weight_bits, bits_per_device, sigma, level_sigma,
                                verified_sigma, th, verify, verify_mask)
      .scale;
}

double check_perturbed_conv2d_op(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& delta, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups, bool x_stacked, const at::Tensor& seeds,
                                 int64_t layer_id, int64_t kind, std::optional<double> scale,
                                 int64_t weight_bits, int64_t bits_per_device, double sigma,
                                 at::ArrayRef<double> level_sigma, double verified_sigma,
                                 double th, bool verify,
                                 const std::optional<at::Tensor>& verify_mask) {
  return check_perturbed_conv2d(x, weight, bias, delta, stride, padding, dilation, groups,
                                x_stacked, seeds, layer_id, kind, scale, weight_bits,
                                bits_per_device, sigma, level_sigma, verified_sigma, th, verify,
                                verify_mask)
      .scale;
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
