// cimext::sign_step_ on CUDA: deltas[i] <- clamp(deltas[i] - eta * sign(grads[i]), -b_i, b_i) for
// every i, in place (b_i a number, or per element from bound_tensors[i]); one launch per dtype
// covers up to 32 tensors (sign_step_cuda.cuh).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda_types.cuh"

#include <vector>

#include "../common/checks.h"  // check_sign_step: one validation for every backend
#include "../kernels/sign_step_cuda.cuh"

namespace cimext::cuda {
namespace {

void sign_step_cuda(at::TensorList deltas, at::TensorList grads, double eta,
                    at::ArrayRef<double> bounds, const BoundTensors& bound_tensors) {
  // The ATen calls below (contiguous copies) are implementation details: keep autograd out.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_sign_step(deltas, grads, eta, bounds, bound_tensors);
  TORCH_CHECK_VALUE(deltas.empty() || deltas[0].is_cuda(),
                    "sign_step_: this kernel takes CUDA tensors, got deltas[0] on ",
                    deltas[0].device());
  if (deltas.empty()) return;
  const c10::cuda::CUDAGuard guard(deltas[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Contiguous working copies where needed; non-contiguous deltas are written back at the end.
  const size_t count = deltas.size();
  std::vector<at::Tensor> work(count), grad(count), bound(count);
  for (size_t i = 0; i < count; ++i) {
    work[i] = deltas[i].is_contiguous() ? deltas[i] : deltas[i].contiguous();
    grad[i] = grads[i].contiguous();
    const at::Tensor b = bound_tensor(bound_tensors, i);
    if (b.defined()) bound[i] = b.contiguous();
  }
  // One launch sequence per dtype present (usually one).
  for (const at::ScalarType dtype : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
    std::vector<void*> d;
    std::vector<const void*> g, bt;
    std::vector<int64_t> n;
    std::vector<double> b;
    for (size_t i = 0; i < count; ++i) {
      if (work[i].scalar_type() != dtype) continue;
      d.push_back(work[i].data_ptr());
      g.push_back(grad[i].const_data_ptr());
      bt.push_back(bound[i].defined() ? bound[i].const_data_ptr() : nullptr);
      n.push_back(work[i].numel());
      b.push_back(bounds[i]);
    }
    if (d.empty()) continue;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "sign_step_cuda", [&] {
      using T = typename CudaType<scalar_t>::type;
      C10_CUDA_CHECK(launch_sign_step<T>(
          reinterpret_cast<T* const*>(d.data()), reinterpret_cast<const T* const*>(g.data()),
          reinterpret_cast<const T* const*>(bt.data()), n.data(), b.data(),
          static_cast<int>(d.size()), eta, stream));
    });
  }
  for (size_t i = 0; i < count; ++i)
    if (!work[i].is_same(deltas[i])) deltas[i].copy_(work[i]);
}

}  // namespace

TORCH_LIBRARY_IMPL(cimext, CUDA, m) { m.impl("sign_step_", &sign_step_cuda); }

}  // namespace cimext::cuda
