// The argument checks of the curvature ops (hdiag_linear, hdiag_conv2d, curv_backward_linear,
// curv_backward_conv2d), shared by csrc/cpu/hdiag.cpp and csrc/cuda/hdiag.cu: one validation, one
// message, for every backend. `dt` is the device type the calling kernel takes.
#include "hdiag_checks.h"

namespace cimext {

namespace {

void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ",
                   name, " must be float32 or float64, got ", t.scalar_type());
}

void check_pair(const at::Tensor& a, const at::Tensor& b, const char* op, const char* an,
                const char* bn, c10::DeviceType device_type) {
  check_float(a, op, an);
  TORCH_CHECK_TYPE(b.scalar_type() == a.scalar_type(), op, ": ", bn, " dtype ", b.scalar_type(),
                   " must match ", an, " dtype ", a.scalar_type());
  TORCH_CHECK_VALUE(a.device().type() == device_type, op, ": this kernel takes ", device_type,
                    " tensors, got ", an, " on ", a.device());
  TORCH_CHECK_VALUE(b.device() == a.device(), op, ": ", bn, " is on ", b.device(), " but ", an,
                    " is on ", a.device());
}

void check_conv_args(const char* op, at::IntArrayRef kernel, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  for (int k = 0; k < 2; ++k) {
    TORCH_CHECK_VALUE(kernel[k] >= 1, op, ": kernel_size must be >= 1, got ", kernel);
    TORCH_CHECK_VALUE(stride[k] >= 1, op, ": stride must be >= 1, got ", stride);
    TORCH_CHECK_VALUE(padding[k] >= 0, op, ": padding must be >= 0, got ", padding);
    TORCH_CHECK_VALUE(dilation[k] >= 1, op, ": dilation must be >= 1, got ", dilation);
  }
  TORCH_CHECK_VALUE(groups >= 1, op, ": groups must be >= 1, got ", groups);
}

int64_t conv_out(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d) {
  return (in + 2 * p - d * (k - 1) - 1) / s + 1;
}

}  // namespace

void check_hdiag_linear(const at::Tensor& x, const at::Tensor& s, c10::DeviceType dt) {
  const char* op = "hdiag_linear";
  check_pair(x, s, op, "x", "s_out", dt);
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension, got a scalar");
  TORCH_CHECK_VALUE(s.dim() == x.dim() && s.sizes().slice(0, s.dim() - 1) ==
                                              x.sizes().slice(0, x.dim() - 1),
                    op, ": s_out shape ", s.sizes(), " must be x shape ", x.sizes(),
                    " with the last dimension replaced by out_features");
}

void check_curv_backward_linear(const at::Tensor& s, const at::Tensor& w, c10::DeviceType dt) {
  const char* op = "curv_backward_linear";
  check_pair(s, w, op, "s_out", "weight", dt);
  TORCH_CHECK_VALUE(w.dim() == 2, op, ": weight must be 2-D (out, in), got shape ", w.sizes());
  TORCH_CHECK_VALUE(s.dim() >= 1 && s.size(-1) == w.size(0), op, ": s_out shape ", s.sizes(),
                    " must end in out_features = ", w.size(0));
}

void check_hdiag_conv2d(const at::Tensor& x, const at::Tensor& s, at::IntArrayRef kernel,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                        int64_t groups, c10::DeviceType dt) {
  const char* op = "hdiag_conv2d";
  check_pair(x, s, op, "x", "s_out", dt);
  check_conv_args(op, kernel, stride, padding, dilation, groups);
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK_VALUE(s.dim() == 4, op, ": s_out must be (N, O, OH, OW), got shape ", s.sizes());
  TORCH_CHECK_VALUE(x.size(1) % groups == 0 && s.size(1) % groups == 0, op, ": groups ", groups,
                    " must divide the channels of x (", x.size(1), ") and s_out (", s.size(1),
                    ")");
  const int64_t oh = conv_out(x.size(2), kernel[0], stride[0], padding[0], dilation[0]);
  const int64_t ow = conv_out(x.size(3), kernel[1], stride[1], padding[1], dilation[1]);
  TORCH_CHECK_VALUE(oh >= 1 && ow >= 1, op, ": the kernel does not fit the padded input ",
                    x.sizes());
  TORCH_CHECK_VALUE(s.size(0) == x.size(0) && s.size(2) == oh && s.size(3) == ow, op,
                    ": s_out shape ", s.sizes(), " must be (", x.size(0), ", O, ", oh, ", ", ow,
                    ") for x shape ", x.sizes());
}

void check_curv_backward_conv2d(const at::Tensor& s, const at::Tensor& w,
                                at::IntArrayRef input_size, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                c10::DeviceType dt) {
  const char* op = "curv_backward_conv2d";
  check_pair(s, w, op, "s_out", "weight", dt);
  TORCH_CHECK_VALUE(w.dim() == 4, op, ": weight must be (O, C/groups, kh, kw), got shape ",
                    w.sizes());
  check_conv_args(op, w.sizes().slice(2), stride, padding, dilation, groups);
  TORCH_CHECK_VALUE(s.dim() == 4, op, ": s_out must be (N, O, OH, OW), got shape ", s.sizes());
  TORCH_CHECK_VALUE(w.size(0) % groups == 0, op, ": groups ", groups,
                    " must divide out_channels ", w.size(0));
  TORCH_CHECK_VALUE(s.size(1) == w.size(0), op, ": s_out has ", s.size(1),
                    " channels, weight has out_channels ", w.size(0));
  TORCH_CHECK_VALUE(input_size[0] >= 1 && input_size[1] >= 1, op,
                    ": input_size must be positive, got ", input_size);
  const int64_t oh = conv_out(input_size[0], w.size(2), stride[0], padding[0], dilation[0]);
  const int64_t ow = conv_out(input_size[1], w.size(3), stride[1], padding[1], dilation[1]);
  TORCH_CHECK_VALUE(s.size(2) == oh && s.size(3) == ow, op, ": s_out spatial size (", s.size(2),
                    ", ", s.size(3), ") must be (", oh, ", ", ow, ") for input_size ", input_size);
}

}  // namespace cimext
