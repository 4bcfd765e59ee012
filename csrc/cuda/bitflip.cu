// cimext::bitflip / bitflip_ on CUDA: flips bits of a tensor's raw representation in place (the
// out-of-place op flips a contiguous clone); one thread per segment (bitflip_cuda.cuh).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../common/checks.h"  // check_bitflip: one validation for every backend
#include "../kernels/bitflip_cuda.cuh"

namespace cimext::cuda {
namespace {

at::Tensor bitflip_cuda_(at::Tensor& t, double p01, double p10, int64_t mask, int64_t seed,
                         int64_t layer_id, bool zero_nonfinite) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  BitflipParams p;
  const bool any = check_bitflip(t, p01, p10, mask, layer_id, zero_nonfinite, true, &p);
  TORCH_CHECK_VALUE(t.is_cuda(), "bitflip: this kernel takes CUDA tensors, got t on ",
                    t.device());
  at::Tensor flips = at::zeros({}, t.options().dtype(at::kLong));
  if (!any) return flips;
  const c10::cuda::CUDAGuard guard(t.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  p.stream = stream_seed(static_cast<uint64_t>(seed), static_cast<uint64_t>(layer_id));
  at::Tensor work = t.is_contiguous() ? t : t.contiguous();
  auto* count = reinterpret_cast<unsigned long long*>(flips.data_ptr<int64_t>());
  void* data = work.data_ptr();
  switch (bitflip_width(t.scalar_type())) {
    case 32:
      C10_CUDA_CHECK(launch_bitflip(p, static_cast<uint32_t*>(data), count, stream));
      break;
    case 16:
      C10_CUDA_CHECK(launch_bitflip(p, static_cast<uint16_t*>(data), count, stream));
      break;
    default:
      C10_CUDA_CHECK(launch_bitflip(p, static_cast<uint8_t*>(data), count, stream));
      break;
  }
  if (!work.is_same(t)) t.copy_(work);
  return flips;
}

std::tuple<at::Tensor, at::Tensor> bitflip_cuda(const at::Tensor& t, double p01, double p10,
                                                int64_t mask, int64_t seed, int64_t layer_id,
                                                bool zero_nonfinite) {
  BitflipParams p;
  check_bitflip(t, p01, p10, mask, layer_id, zero_nonfinite, false, &p);  // before the copy
  at::Tensor out = t.clone(at::MemoryFormat::Contiguous);
  at::Tensor flips = bitflip_cuda_(out, p01, p10, mask, seed, layer_id, zero_nonfinite);
  return {out, flips};
}

}  // namespace

TORCH_LIBRARY_IMPL(cimext, CUDA, m) {
  m.impl("bitflip", &bitflip_cuda);
  m.impl("bitflip_", &bitflip_cuda_);
}

}  // namespace cimext::cuda
