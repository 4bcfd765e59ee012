// Argument checks of sign_step_, shared by the CPU and CUDA implementations.
#pragma once
#include <ATen/ATen.h>

namespace cimext::cpu {

// The optional per-element bounds of sign_step_ (schema type Tensor?[]?).
using BoundTensors = std::optional<c10::List<std::optional<at::Tensor>>>;

// Throws (naming the argument) unless: deltas, grads and bounds have one entry per tensor; every
// delta is float32 / float64 / float16 / bfloat16 on one device of type `device_type`, without
// internal overlap and sharing no memory with another delta; grads[i] matches deltas[i] in shape,
// dtype and device; eta and every bound are finite and >= 0; bound_tensors is absent or has one
// entry per delta, each absent or a tensor like deltas[i] (shape, dtype, device) sharing no memory
// with a delta, with entries finite and >= 0. Reads no tensor data except the bound tensors'.
void check_sign_step(at::TensorList deltas, at::TensorList grads, double eta,
                     at::ArrayRef<double> bounds, const BoundTensors& bound_tensors,
                     c10::DeviceType device_type);

// bound_tensors[i] when it is given, else an undefined tensor.
at::Tensor bound_tensor(const BoundTensors& bound_tensors, size_t i);

}  // namespace cimext::cpu
