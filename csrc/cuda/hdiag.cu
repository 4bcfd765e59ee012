// cimext curvature ops on CUDA: hdiag_linear, hdiag_conv2d, curv_backward_linear,
// curv_backward_conv2d (kernels in hdiag_cuda.cuh; checks shared with csrc/cpu/hdiag.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "../common/hdiag_checks.h"  // the hdiag checks: one validation for every backend
#include "../kernels/hdiag_cuda.cuh"

namespace cimext::cuda {
namespace {

ConvGeom geom(const at::Tensor& s, int64_t N, int64_t C, int64_t H, int64_t W, int64_t KH,
              int64_t KW, at::IntArrayRef stride, at::IntArrayRef padding,
              at::IntArrayRef dilation, int64_t groups) {
  return ConvGeom{N,         C,          H,          W,          s.size(1),  s.size(2),
                  s.size(3), KH,         KW,         stride[0],  stride[1],  padding[0],
                  padding[1], dilation[0], dilation[1], groups};
}

at::Tensor hdiag_linear_cuda(const at::Tensor& x_in, const at::Tensor& s_in) {
  check_hdiag_linear(x_in, s_in, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t in = x_in.size(-1), out = s_in.size(-1);
  const at::Tensor x = x_in.reshape({-1, in}).contiguous();
  const at::Tensor s = s_in.reshape({-1, out}).contiguous();
  at::Tensor h = at::empty({out, in}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hdiag_linear_cuda", [&] {
    C10_CUDA_CHECK(launch_hdiag_linear<scalar_t>(
        x.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(), x.size(0), in, out,
        h.data_ptr<scalar_t>(), c10::cuda::getCurrentCUDAStream()));
  });
  return h;
}

at::Tensor curv_backward_linear_cuda(const at::Tensor& s_in, const at::Tensor& w_in) {
  check_curv_backward_linear(s_in, w_in, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(s_in.device());
  const int64_t out = w_in.size(0), in = w_in.size(1);
  const at::Tensor s = s_in.reshape({-1, out}).contiguous(), w = w_in.contiguous();
  std::vector<int64_t> shape(s_in.sizes().begin(), s_in.sizes().end());
  shape.back() = in;
  at::Tensor r = at::empty({s.size(0), in}, s.options());
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "curv_backward_linear_cuda", [&] {
    C10_CUDA_CHECK(launch_curv_backward_linear<scalar_t>(
        s.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), s.size(0), out, in,
        r.data_ptr<scalar_t>(), c10::cuda::getCurrentCUDAStream()));
  });
  return r.view(shape);
}

at::Tensor hdiag_conv2d_cuda(const at::Tensor& x_in, const at::Tensor& s_in,
                             at::IntArrayRef kernel, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_hdiag_conv2d(x_in, s_in, kernel, stride, padding, dilation, groups,
                          c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), s = s_in.contiguous();
  const ConvGeom g = geom(s, x.size(0), x.size(1), x.size(2), x.size(3), kernel[0], kernel[1],
                          stride, padding, dilation, groups);
  at::Tensor h = at::empty({g.O, g.C / groups, g.KH, g.KW}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hdiag_conv2d_cuda", [&] {
    C10_CUDA_CHECK(launch_hdiag_conv2d<scalar_t>(g, x.const_data_ptr<scalar_t>(),
                                                 s.const_data_ptr<scalar_t>(),
                                                 h.data_ptr<scalar_t>(),
                                                 c10::cuda::getCurrentCUDAStream()));
  });
  return h;
}

at::Tensor curv_backward_conv2d_cuda(const at::Tensor& s_in, const at::Tensor& w_in,
                                     at::IntArrayRef input_size, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation,
                                     int64_t groups) {
  check_curv_backward_conv2d(s_in, w_in, input_size, stride, padding, dilation, groups,
                                  c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(s_in.device());
  const at::Tensor s = s_in.contiguous(), w = w_in.contiguous();
  const ConvGeom g = geom(s, s.size(0), w.size(1) * groups, input_size[0], input_size[1],
                          w.size(2), w.size(3), stride, padding, dilation, groups);
  at::Tensor r = at::empty({g.N, g.C, g.H, g.W}, s.options());
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "curv_backward_conv2d_cuda", [&] {
    C10_CUDA_CHECK(launch_curv_backward_conv2d<scalar_t>(g, s.const_data_ptr<scalar_t>(),
                                                         w.const_data_ptr<scalar_t>(),
                                                         r.data_ptr<scalar_t>(),
                                                         c10::cuda::getCurrentCUDAStream()));
  });
  return r;
}

}  // namespace

TORCH_LIBRARY_IMPL(cimext, CUDA, m) {
  m.impl("hdiag_linear", &hdiag_linear_cuda);
  m.impl("hdiag_conv2d", &hdiag_conv2d_cuda);
  m.impl("curv_backward_linear", &curv_backward_linear_cuda);
  m.impl("curv_backward_conv2d", &curv_backward_conv2d_cuda);
}

}  // namespace cimext::cuda
