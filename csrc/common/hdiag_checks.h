// The argument checks of the curvature ops, shared by csrc/cpu/hdiag.cpp and csrc/cuda/hdiag.cu
// (one validation, one message, for every backend); defined in hdiag_checks.cpp.
#pragma once
#include <ATen/ATen.h>

namespace cimext {

// `dt`: the device type the calling kernel takes.
void check_hdiag_linear(const at::Tensor& x, const at::Tensor& s, c10::DeviceType dt);
void check_curv_backward_linear(const at::Tensor& s, const at::Tensor& w, c10::DeviceType dt);
void check_hdiag_conv2d(const at::Tensor& x, const at::Tensor& s, at::IntArrayRef kernel,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                        int64_t groups, c10::DeviceType dt);
void check_curv_backward_conv2d(const at::Tensor& s, const at::Tensor& w,
                                at::IntArrayRef input_size, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                c10::DeviceType dt);

}  // namespace cimext
