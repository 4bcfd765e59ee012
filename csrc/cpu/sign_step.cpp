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
#include "sign_step_common.h"

namespace cimext::cpu {

at::Tensor bound_tensor(const BoundTensors& bound_tensors, size_t i) {
  if (!bound_tensors.has_value()) return at::Tensor();
  const std::optional<at::Tensor> b = bound_tensors->get(i);
  return b.has_value() ? *b : at::Tensor();
}

namespace {

// [first byte, last byte + 1) of a non-empty tensor (non-negative strides).
std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor& t) {
  int64_t extent = 1;
  for (int64_t k = 0; k < t.dim(); ++k) extent += (t.size(k) - 1) * t.stride(k);
  const auto first = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  return {first, first + static_cast<uintptr_t>(extent * t.element_size())};
}

}  // namespace

void check_sign_step(at::TensorList deltas, at::TensorList grads, double eta,
                     at::ArrayRef<double> bounds, const BoundTensors& bound_tensors,
                     c10::DeviceType device_type) {
  // ValueError / TypeError in Python, like the checks of cimext.reference.check_sign_step.
  TORCH_CHECK_VALUE(deltas.size() == grads.size() && deltas.size() == bounds.size(),
                    "sign_step_: deltas, grads and bounds need one entry per tensor, got ",
                    deltas.size(), " deltas, ", grads.size(), " grads and ", bounds.size(),
                    " bounds");
  TORCH_CHECK_VALUE(!bound_tensors.has_value() || bound_tensors->size() == deltas.size(),
                    "sign_step_: bound_tensors needs one entry (a tensor or None) per delta, got ",
                    bound_tensors.has_value() ? bound_tensors->size() : 0, " for ",
                    deltas.size(), " deltas");
  TORCH_CHECK_VALUE(std::isfinite(eta) && eta >= 0,
                    "sign_step_: eta must be finite and >= 0, got ", eta);
  // Byte spans of every non-empty delta and bound tensor, to find shared memory.
  std::vector<std::pair<std::pair<uintptr_t, uintptr_t>, size_t>> spans, bound_spans;
  for (size_t i = 0; i < deltas.size(); ++i) {
    const at::Tensor& d = deltas[i];
    const at::Tensor& g = grads[i];
    TORCH_CHECK_VALUE(std::isfinite(bounds[i]) && bounds[i] >= 0, "sign_step_: bounds[", i,
                      "] must be finite and >= 0, got ", bounds[i]);
    TORCH_CHECK_VALUE(d.device() == deltas[0].device(), "sign_step_: deltas[", i, "] is on ",
                      d.device(), " but deltas[0] is on ", deltas[0].device(),
                      " (all deltas must be on one device)");
    TORCH_CHECK_VALUE(g.device() == d.device(), "sign_step_: grads[", i, "] is on ", g.device(),
                      " but deltas[", i, "] is on ", d.device());
    TORCH_CHECK_VALUE(d.device().type() == device_type, "sign_step_: this kernel takes ",
                      device_type, " tensors, got deltas[", i, "] on ", d.device());
    const auto t = d.scalar_type();
    TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
                     "sign_step_: deltas[", i,
                     "] must be float32, float64, float16 or bfloat16, got ", t);
    TORCH_CHECK_TYPE(g.scalar_type() == t, "sign_step_: grads[", i, "] dtype ", g.scalar_type(),
                     " must match deltas[", i, "] dtype ", t);
    TORCH_CHECK_VALUE(g.sizes() == d.sizes(), "sign_step_: grads[", i, "] shape ", g.sizes(),
                      " must equal deltas[", i, "] shape ", d.sizes());
    const at::Tensor b = bound_tensor(bound_tensors, i);
    if (b.defined()) {
      TORCH_CHECK_VALUE(b.device() == d.device(), "sign_step_: bound_tensors[", i, "] is on ",
                        b.device(), " but deltas[", i, "] is on ", d.device());
      TORCH_CHECK_TYPE(b.scalar_type() == t, "sign_step_: bound_tensors[", i, "] dtype ",
                       b.scalar_type(), " must match deltas[", i, "] dtype ", t);
      TORCH_CHECK_VALUE(b.sizes() == d.sizes(), "sign_step_: bound_tensors[", i, "] shape ",
                        b.sizes(), " must equal deltas[", i, "] shape ", d.sizes());
    }
    if (d.numel() == 0) continue;
    TORCH_CHECK_VALUE(at::has_internal_overlap(d) != at::MemOverlap::Yes, "sign_step_: deltas[",
                      i, "] has elements that share memory (an expanded view?); it cannot be ",
                      "written");
    spans.push_back({byte_span(d), i});
    if (b.defined()) {
      // The one check that reads data: a NaN bound would let NaN through the clamp's selects.
      TORCH_CHECK_VALUE(at::isfinite(b).logical_and(b.ge(0)).all().item<bool>(),
                        "sign_step_: bound_tensors[", i, "] must be finite and >= 0 everywhere ",
                        "(it has a negative, NaN or infinite entry)");
      bound_spans.push_back({byte_span(b), i});
    }
  }
  std::sort(spans.begin(), spans.end());
  for (size_t k = 1; k < spans.size(); ++k)
    TORCH_CHECK_VALUE(spans[k].first.first >= spans[k - 1].first.second, "sign_step_: deltas[",
                      spans[k - 1].second, "] and deltas[", spans[k].second,
                      "] overlap in memory; every delta must be a separate tensor");
  for (const auto& bs : bound_spans)
    for (const auto& ds : spans)
      TORCH_CHECK_VALUE(bs.first.first >= ds.first.second || ds.first.first >= bs.first.second,
                        "sign_step_: bound_tensors[", bs.second, "] shares memory with deltas[",
                        ds.second, "], which is written");
}

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
  check_sign_step(deltas, grads, eta, bounds, bound_tensors, c10::DeviceType::CPU);
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
  // Outside inference mode (which skips this kernel) an inference tensor has no version counter:
  // refuse it before anything is written, as ATen's in-place ops do.
  for (size_t i = 0; i < deltas.size(); ++i)
    TORCH_CHECK(!deltas[i].is_inference(), "sign_step_: deltas[", i,
                "] is an inference tensor; in-place updates of it are only allowed inside "
                "torch.inference_mode()");
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
