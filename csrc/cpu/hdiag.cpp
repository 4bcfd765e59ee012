// Becker–LeCun curvature ops (DESIGN section 5) on CPU, and their schemas.
//
//   hdiag_linear(x, s_out)            H[o, i]        = Σ_n s_out[n, o] · x[n, i]²
//   hdiag_conv2d(x, s_out, ...)       H[o, c, kh, kw] = Σ_n,p s_out[n, o, p] · x[n, c, p·stride + k·dil − pad]²
//   curv_backward_linear(s_out, w)    S_in = s_out · (W²)             (S_in = (W²)ᵀ S_out per sample)
//   curv_backward_conv2d(s_out, w, .) S_in = conv_transpose(s_out, W²)
//
// x² is never formed for the whole batch: hdiag_linear squares a block of rows at a time, and
// hdiag_conv2d squares while it unfolds a block of samples (the column matrix is the memory that
// matters for a convolution), then one GEMM per block accumulates into H.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../common/hdiag_checks.h"  // the hdiag checks: one validation for every backend

namespace cimext::cpu {

namespace {

at::Tensor hdiag_linear_cpu(const at::Tensor& x, const at::Tensor& s_out) {
  check_hdiag_linear(x, s_out, c10::DeviceType::CPU);
  const int64_t in = x.size(-1), out = s_out.size(-1);
  const at::Tensor x2d = x.reshape({-1, in}), s2d = s_out.reshape({-1, out});
  at::Tensor h = at::zeros({out, in}, x.options());
  constexpr int64_t kRows = 256;  // rows squared per GEMM: x² never exists for the whole batch
  for (int64_t r = 0; r < x2d.size(0); r += kRows) {
    const int64_t e = std::min(x2d.size(0), r + kRows);
    h.addmm_(s2d.slice(0, r, e).t(), x2d.slice(0, r, e).square());
  }
  return h;
}

at::Tensor curv_backward_linear_cpu(const at::Tensor& s_out, const at::Tensor& weight) {
  check_curv_backward_linear(s_out, weight, c10::DeviceType::CPU);
  return at::matmul(s_out, weight.square());
}

// Columns of the squared input for samples [n0, n0 + nb): cols[(c, kh, kw), (b, oh, ow)], rows
// row_len apart (the buffer is sized for the largest block).
template <typename T>
void unfold_squared(const T* x, T* cols, int64_t row_len, int64_t n0, int64_t nb, int64_t C,
                    int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t OH, int64_t OW,
                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const int64_t L = OH * OW;
  at::parallel_for(0, C * kh * kw, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t c = r / (kh * kw), i = (r / kw) % kh, j = r % kw;
      for (int64_t b = 0; b < nb; ++b) {
        const T* xc = x + ((n0 + b) * C + c) * H * W;
        T* dst = cols + r * row_len + b * L;
        for (int64_t oh = 0; oh < OH; ++oh) {
          const int64_t h = oh * stride[0] - padding[0] + i * dilation[0];
          for (int64_t ow = 0; ow < OW; ++ow) {
            const int64_t w = ow * stride[1] - padding[1] + j * dilation[1];
            const T v = (h >= 0 && h < H && w >= 0 && w < W) ? xc[h * W + w] : T(0);
            dst[oh * OW + ow] = v * v;
          }
        }
      }
    }
  });
}

at::Tensor hdiag_conv2d_cpu(const at::Tensor& x_in, const at::Tensor& s_in,
                            at::IntArrayRef kernel, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_hdiag_conv2d(x_in, s_in, kernel, stride, padding, dilation, groups,
                     c10::DeviceType::CPU);
  const at::Tensor x = x_in.contiguous(), s = s_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t O = s.size(1), OH = s.size(2), OW = s.size(3), L = OH * OW;
  const int64_t kh = kernel[0], kw = kernel[1], Cg = C / groups, Og = O / groups;
  const int64_t K = Cg * kh * kw;
  at::Tensor h = at::zeros({groups, Og, K}, x.options());
  if (N == 0 || O == 0 || K == 0) return h.view({O, Cg, kh, kw});
  // Samples per block: the column buffer stays near 4M elements (16 MB in float32).
  const int64_t nb_max = std::max<int64_t>(1, (int64_t{1} << 22) / std::max<int64_t>(1, C * kh * kw * L));
  at::Tensor cols = at::empty({C * kh * kw, std::min(N, nb_max) * L}, x.options());
  for (int64_t n0 = 0; n0 < N; n0 += nb_max) {
    const int64_t nb = std::min(nb_max, N - n0);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hdiag_conv2d_cpu", [&] {
      unfold_squared<scalar_t>(x.const_data_ptr<scalar_t>(), cols.data_ptr<scalar_t>(),
                               cols.size(1), n0, nb, C, H, W, kh, kw, OH, OW, stride, padding,
                               dilation);
    });
    // s block (nb, O, L) -> (O, nb·L), the column order of cols.
    const at::Tensor sb = s.slice(0, n0, n0 + nb).view({nb, O, L}).permute({1, 0, 2}).reshape(
        {O, nb * L});
    const at::Tensor cb = cols.narrow(1, 0, nb * L);
    for (int64_t g = 0; g < groups; ++g)
      h[g].addmm_(sb.slice(0, g * Og, (g + 1) * Og), cb.slice(0, g * K, (g + 1) * K).t());
  }
  return h.view({O, Cg, kh, kw});
}

at::Tensor curv_backward_conv2d_cpu(const at::Tensor& s_out, const at::Tensor& weight,
                                    at::IntArrayRef input_size, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation,
                                    int64_t groups) {
  check_curv_backward_conv2d(s_out, weight, input_size, stride, padding, dilation, groups,
                             c10::DeviceType::CPU);
  // output_padding recovers the rows / columns a strided convolution never read.
  std::vector<int64_t> out_pad(2);
  for (int k = 0; k < 2; ++k)
    out_pad[k] = input_size[k] - ((s_out.size(2 + k) - 1) * stride[k] - 2 * padding[k] +
                                  dilation[k] * (weight.size(2 + k) - 1) + 1);
  if (s_out.size(0) == 0)
    return at::zeros({0, weight.size(1) * groups, input_size[0], input_size[1]},
                     s_out.options());
  return at::conv_transpose2d(s_out, weight.square(), {}, stride, padding, out_pad, groups,
                              dilation);
}

}  // namespace

TORCH_LIBRARY_IMPL(cimext, CPU, m) {
  m.impl("hdiag_linear", &hdiag_linear_cpu);
  m.impl("hdiag_conv2d", &hdiag_conv2d_cpu);
  m.impl("curv_backward_linear", &curv_backward_linear_cpu);
  m.impl("curv_backward_conv2d", &curv_backward_conv2d_cpu);
}

}  // namespace cimext::cpu
