// cimext::sign_step_ on CPU: deltas[i] <- clamp(deltas[i] - eta * sign(grads[i]), -b_i, b_i) for
// every i, in place (b_i a number, or per element from bound_tensors[i]). The elements of all tensors are cut into chunks and one parallel_for covers
// every chunk of every tensor, so many small layers cost one fork, not one each.
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "../kernels/sign_step.h"
#include "../common/checks.h"  // check_sign_step: one validation for every backend

namespace cimext::cpu {

namespace {

// A contiguous range of one tensor: elements [begin, end) of job `job`.
struct Chunk {
  size_t job;
  int64_t begin, end;
};

struct Job {
  void* delta;
  const void* grad;
  const void* bound_t;  // per-element bounds, or nullptr: `bound` for every element
  at::ScalarType dtype;
  double bound;
};

template <typename scalar_t>
void sign_step_range(const Job& job, double eta, int64_t begin, int64_t end) {
  // Acc: float for float32 and the 16-bit types (torch's opmath), double for float64.
  using Acc = at::opmath_type<scalar_t>;
  const Acc e = static_cast<Acc>(eta), b = static_cast<Acc>(job.bound);
  scalar_t* __restrict__ d = static_cast<scalar_t*>(job.delta);
  const scalar_t* __restrict__ g = static_cast<const scalar_t*>(job.grad);
  const scalar_t* __restrict__ bt = static_cast<const scalar_t*>(job.bound_t);
  // Two loops rather than a branch per element, so that both vectorize.
  if (bt == nullptr) {
    for (int64_t i = begin; i < end; ++i)
      d[i] = static_cast<scalar_t>(
          sign_step<Acc>(static_cast<Acc>(d[i]), static_cast<Acc>(g[i]), e, b));
  } else {
    for (int64_t i = begin; i < end; ++i)
      d[i] = static_cast<scalar_t>(sign_step<Acc>(static_cast<Acc>(d[i]), static_cast<Acc>(g[i]),
                                                  e, static_cast<Acc>(bt[i])));
  }
}

void sign_step_cpu(at::TensorList deltas, at::TensorList grads, double eta,
                   at::ArrayRef<double> bounds, const BoundTensors& bound_tensors) {
  // The ATen calls below (contiguous copies) are implementation details: keep autograd out.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_sign_step(deltas, grads, eta, bounds, bound_tensors);
  TORCH_CHECK_VALUE(deltas.empty() || deltas[0].is_cpu(),
                    "sign_step_: this kernel takes CPU tensors, got deltas[0] on ",
                    deltas[0].device());
  // Contiguous working copies where needed; non-contiguous deltas are written back at the end.
  std::vector<at::Tensor> work(deltas.size()), grad(deltas.size()), bound(deltas.size());
  std::vector<Job> jobs(deltas.size());
  std::vector<Chunk> chunks;
  constexpr int64_t kChunk = 16384;  // elements: big enough to amortize, small enough to balance
  for (size_t i = 0; i < deltas.size(); ++i) {
    work[i] = deltas[i].is_contiguous() ? deltas[i] : deltas[i].contiguous();
    grad[i] = grads[i].contiguous();
    const at::Tensor b = bound_tensor(bound_tensors, i);
    if (b.defined()) bound[i] = b.contiguous();
    jobs[i] = Job{work[i].data_ptr(), grad[i].const_data_ptr(),
                  b.defined() ? bound[i].const_data_ptr() : nullptr, work[i].scalar_type(),
                  bounds[i]};
    const int64_t n = work[i].numel();
    for (int64_t b = 0; b < n; b += kChunk) chunks.push_back({i, b, std::min(n, b + kChunk)});
  }
  // Grain of two chunks: ATen's elementwise grain (32768 elements); less runs on this thread.
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 2, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const Chunk& ch = chunks[c];
      const Job& job = jobs[ch.job];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, job.dtype, "sign_step_cpu", [&] {
        sign_step_range<scalar_t>(job, eta, ch.begin, ch.end);
      });
    }
  });
  for (size_t i = 0; i < deltas.size(); ++i)
    if (!work[i].is_same(deltas[i])) deltas[i].copy_(work[i]);
}

// Every backend: bump the version counters of the written deltas, as ATen's in-place ops do, so
// that autograd notices a delta that was saved for backward and then stepped.
void sign_step_ad_inplace_or_view(c10::DispatchKeySet keys, at::TensorList deltas,
                                  at::TensorList grads, double eta, at::ArrayRef<double> bounds,
                                  const BoundTensors& bound_tensors) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("cimext::sign_step_", "")
                             .typed<void(at::TensorList, at::TensorList, double,
                                         at::ArrayRef<double>, const BoundTensors&)>();
  // Inference tensors (no version counter) are refused by check_sign_step in the kernel,
  // before anything is written.
  {
    at::AutoDispatchBelowADInplaceOrView below;
    op.redispatch(keys & c10::after_ADInplaceOrView_keyset, deltas, grads, eta, bounds,
                  bound_tensors);
  }
  for (const at::Tensor& d : deltas) torch::autograd::impl::bump_version(d);
}

}  // namespace

TORCH_LIBRARY_IMPL(cimext, CPU, m) { m.impl("sign_step_", &sign_step_cpu); }

TORCH_LIBRARY_IMPL(cimext, ADInplaceOrView, m) {
  m.impl("sign_step_", TORCH_FN(sign_step_ad_inplace_or_view));
}

}  // namespace cimext::cpu
