// The argument checks of every cimext op: the one place where they live. The CPU kernels
// (csrc/cpu), the CUDA kernels (csrc/cuda) and the check-only ops cimext::_check_<op> (see
// check_ops.cpp; called first by the Triton launchers and the reference backend) all run these
// functions, so every backend raises the same exception type (TypeError for a wrong type or
// dtype, ValueError for a wrong value, shape or device, RuntimeError for a tensor that may not be
// written) with the same message, naming the op and the argument, before anything is written.
// Nothing here reads tensor data except: max|weight| when no scale is given (the op needs it
// anyway; a non-finite one is reported as a bad weight), and the bound tensors of sign_step_.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "../kernels/bitflip.h"
#include "../kernels/noise.h"

namespace cimext {

// The noise arguments of every op schema (CIMEXT_NOISE_ARGS in csrc/cimext.cpp), validated.
struct NoiseSpec {
  NoiseParams params;
  std::vector<uint64_t> seeds;
  uint64_t layer_id;
  double scale;            // the full scale used: the given one or max|weight|
  at::Tensor verify_mask;  // undefined, or uint8/bool contiguous with weight.numel() elements
};

// Checks the noise arguments against `weight` (whose dtype and device check_weight accepts) and
// returns them ready for the kernels; `what` names the op in the messages. seeds: a non-empty 1-D
// int64 tensor on the CPU or weight's device; scale: nullopt computes max|weight|.
NoiseSpec make_spec(const char* what, const at::Tensor& weight, const at::Tensor& seeds,
                    int64_t layer_id, int64_t kind, std::optional<double> scale,
                    int64_t weight_bits, int64_t bits_per_device, double sigma,
                    at::ArrayRef<double> level_sigma, double verified_sigma, double th,
                    bool verify, const std::optional<at::Tensor>& verify_mask);

// s_l = max|weight| rounded to float32 (0 for an empty weight), as reference.full_scale. On a
// CUDA weight this reads one number back to the host. Inf or NaN when the weight holds one.
double full_scale(const at::Tensor& weight);

// weight: a float32 / float64 / float16 / bfloat16 tensor (every backend computes these).
void check_weight(const char* what, const at::Tensor& weight);

// x, bias, delta like weight (device, dtype); bias (out,), delta of weight's shape.
void check_operands(const char* what, const at::Tensor& x, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& delta);

// Every check of perturbed_linear: operands, shapes (x (..., in) or (S, ..., in) when x_stacked,
// weight (out, in)) and the noise arguments.
NoiseSpec check_perturbed_linear(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& delta, bool x_stacked,
                                 const at::Tensor& seeds, int64_t layer_id, int64_t kind,
                                 std::optional<double> scale, int64_t weight_bits,
                                 int64_t bits_per_device, double sigma,
                                 at::ArrayRef<double> level_sigma, double verified_sigma,
                                 double th, bool verify,
                                 const std::optional<at::Tensor>& verify_mask);

// Every check of perturbed_conv2d (operands, convolution geometry, noise arguments).
NoiseSpec check_perturbed_conv2d(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& delta, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups, bool x_stacked, const at::Tensor& seeds,
                                 int64_t layer_id, int64_t kind, std::optional<double> scale,
                                 int64_t weight_bits, int64_t bits_per_device, double sigma,
                                 at::ArrayRef<double> level_sigma, double verified_sigma,
                                 double th, bool verify,
                                 const std::optional<at::Tensor>& verify_mask);

// noise_out's `out`: (S, *weight.shape), weight's dtype and device, no overlap with weight, and
// not an inference tensor outside inference mode.
void check_noise_out(const at::Tensor& weight, int64_t n_seeds, const at::Tensor& out);

// The optional per-element bounds of sign_step_ (schema type Tensor?[]?).
using BoundTensors = std::optional<c10::List<std::optional<at::Tensor>>>;

// Throws (naming the argument) unless: deltas, grads and bounds have one entry per tensor; every
// delta is float32 / float64 / float16 / bfloat16 on one device, writable (no internal overlap,
// no memory shared with another delta, not an inference tensor outside inference mode); grads[i]
// matches deltas[i] in shape, dtype and device; eta and every bound are finite and >= 0;
// bound_tensors is absent or has one entry per delta, each absent or a tensor like deltas[i]
// (shape, dtype, device) sharing no memory with a delta, with entries finite and >= 0.
void check_sign_step(at::TensorList deltas, at::TensorList grads, double eta,
                     at::ArrayRef<double> bounds, const BoundTensors& bound_tensors);

// bound_tensors[i] when it is given, else an undefined tensor.
at::Tensor bound_tensor(const BoundTensors& bound_tensors, size_t i);

// Bits per element of a bitflip dtype (float32, float16, bfloat16, int8, uint8, int16, int32),
// 0 for any other dtype.
int bitflip_width(at::ScalarType t);

// Throws (naming the argument) unless t's dtype is supported, mask fits its width, p01 and p10
// are in [0, 1] and layer_id >= 0 (and, with `in_place`, t may be written); then, unless params
// is null (checks only), fills params (all but the stream) and returns whether any bit can
// flip. Reads no tensor data.
bool check_bitflip(const at::Tensor& t, double p01, double p10, int64_t mask, int64_t layer_id,
                   bool zero_nonfinite, bool in_place, BitflipParams* params);

}  // namespace cimext
