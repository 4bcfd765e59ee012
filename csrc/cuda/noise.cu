// cimext::noise on CUDA: ΔW of a weight for every seed, shape (S, *weight.shape), in one launch.
// Also defines the row-tile launcher that perturbed_linear.cu and
// perturbed_conv2d.cu share (declared in perturbed_tiles.cuh).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda_types.cuh"

#include "../common/checks.h"  // make_spec, check_operands: one validation for every backend
#include "../kernels/noise_cuda.cuh"
#include "perturbed_tiles.cuh"

namespace cimext::cuda {
namespace {

template <typename T>
const typename CudaType<T>::type* in_ptr(const at::Tensor& t) {
  if (!t.defined()) return nullptr;
  return reinterpret_cast<const typename CudaType<T>::type*>(t.const_data_ptr<T>());
}

template <typename T>
typename CudaType<T>::type* out_ptr(at::Tensor& t) {
  return reinterpret_cast<typename CudaType<T>::type*>(t.mutable_data_ptr<T>());
}

// bool and uint8 masks are both one byte per weight, 0 or 1.
const uint8_t* mask_ptr(const at::Tensor& m) {
  return m.defined() ? static_cast<const uint8_t*>(m.const_data_ptr()) : nullptr;
}

// Writes ΔW for every seed into `out`, a contiguous (S, *weight.shape) tensor like weight.
void noise_into(const NoiseSpec& spec, const at::Tensor& weight, at::Tensor& out) {
  const at::Tensor w = weight.contiguous();
  const int64_t S = static_cast<int64_t>(spec.seeds.size()), n = w.numel();
  if (n == 0) return;
  // The stream seeds go to the device in one small blocking copy so that one launch covers every
  // instance; int64 holds the uint64 bit patterns.
  std::vector<int64_t> streams(S);
  for (int64_t s = 0; s < S; ++s)
    streams[s] = static_cast<int64_t>(stream_seed(spec.seeds[s], spec.layer_id));
  const at::Tensor streams_dev =
      at::tensor(streams, at::TensorOptions().dtype(at::kLong)).to(w.options().dtype(at::kLong));
  const auto* sp = reinterpret_cast<const uint64_t*>(streams_dev.const_data_ptr<int64_t>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "noise_cuda", [&] {
    C10_CUDA_CHECK(launch_noise<typename CudaType<scalar_t>::type>(
        spec.params, sp, S, in_ptr<scalar_t>(w), mask_ptr(spec.verify_mask), n,
        out_ptr<scalar_t>(out), c10::cuda::getCurrentCUDAStream()));
  });
}

at::Tensor noise_cuda(const at::Tensor& weight, const at::Tensor& seeds, int64_t layer_id,
                      int64_t mode, std::optional<double> scale, int64_t weight_bits,
                      int64_t bits_per_device, double sigma, at::ArrayRef<double> level_sigma,
                      double verified_sigma, double th, bool verify,
                      const std::optional<at::Tensor>& verify_mask) {
  check_weight("noise", weight);
  const NoiseSpec spec =
      make_spec("noise", weight, seeds, layer_id, mode, scale, weight_bits, bits_per_device,
                     sigma, level_sigma, verified_sigma, th, verify, verify_mask);
  const c10::cuda::CUDAGuard guard(weight.device());
  std::vector<int64_t> shape{static_cast<int64_t>(spec.seeds.size())};
  shape.insert(shape.end(), weight.sizes().begin(), weight.sizes().end());
  at::Tensor out = at::empty(shape, weight.options());
  noise_into(spec, weight, out);
  return out;
}

void noise_out_cuda(const at::Tensor& weight, const at::Tensor& seeds, int64_t layer_id,
                    int64_t mode, std::optional<double> scale, int64_t weight_bits,
                    int64_t bits_per_device, double sigma, at::ArrayRef<double> level_sigma,
                    double verified_sigma, double th, bool verify,
                    const std::optional<at::Tensor>& verify_mask, at::Tensor out) {
  check_weight("noise", weight);
  const NoiseSpec spec =
      make_spec("noise", weight, seeds, layer_id, mode, scale, weight_bits, bits_per_device,
                     sigma, level_sigma, verified_sigma, th, verify, verify_mask);
  check_noise_out(weight, static_cast<int64_t>(spec.seeds.size()), out);
  const c10::cuda::CUDAGuard guard(weight.device());
  if (out.is_contiguous()) {
    noise_into(spec, weight, out);
  } else {
    at::Tensor tmp = at::empty(out.sizes(), out.options());
    noise_into(spec, weight, tmp);
    out.copy_(tmp);
  }
}

}  // namespace

static_assert(kMaxChunk <= kMaxRangeStreams, "a chunk's seeds must fit in one launch");

void perturbed_range_cuda(const NoiseParams& p, const uint64_t* streams, int64_t count,
                          const at::Tensor& w, const at::Tensor& delta, const at::Tensor& mask,
                          int64_t i0, int64_t n, at::Tensor& out) {
  TORCH_CHECK(count >= 1 && count <= kMaxRangeStreams, "perturbed_range_cuda: ", count,
              " instances in one launch (at most ", kMaxRangeStreams, ")");
  TORCH_CHECK(out.is_contiguous() && out.numel() >= count * n,
              "perturbed_range_cuda: the scratch is too small or not contiguous");
  RangeStreams rs;
  rs.count = count;
  for (int64_t c = 0; c < count; ++c) rs.seed[c] = streams[c];
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, w.scalar_type(), "perturbed_range_cuda", [&] {
        C10_CUDA_CHECK(launch_perturbed_range<typename CudaType<scalar_t>::type>(
            p, rs, in_ptr<scalar_t>(w), in_ptr<scalar_t>(delta), mask_ptr(mask), i0, n,
            out_ptr<scalar_t>(out), c10::cuda::getCurrentCUDAStream()));
      });
}

TORCH_LIBRARY_IMPL(cimext, CUDA, m) {
  m.impl("noise", &noise_cuda);
  m.impl("noise_out", &noise_out_cuda);
}

}  // namespace cimext::cuda
