// cimext::bitflip / bitflip_ on CPU: flip bits of a tensor's raw representation (noisy memory),
// O(n + flips) by drawing the gaps between flips (csrc/kernels/bitflip.h). Segments of the flip
// stream touch disjoint elements and run in parallel. The schemas live here (a fragment of the
// cimext library) beside the shared argument checks that the CUDA file reuses.
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "../kernels/bitflip.h"
#include "../common/checks.h"  // check_bitflip: one validation for every backend

namespace cimext::cpu {

namespace {

template <typename U>
int64_t bitflip_all(const BitflipParams& p, U* data) {
  const int64_t segments = bitflip_segments(p);
  // About 4096 expected draws per task: a sparse call (p = 1e-6 on 64 MB is ~800 draws) stays
  // on this thread, where waking the pool would cost more than the work on a loaded machine.
  const double draws = 1.0 + static_cast<double>(p.seg_elems * p.m) * p.pmax;
  const int64_t grain = std::max<int64_t>(1, static_cast<int64_t>(4096.0 / draws));
  return at::parallel_reduce(
      0, segments, grain, int64_t(0),
      [&](int64_t lo, int64_t hi, int64_t acc) {
        for (int64_t s = lo; s < hi; ++s) acc += bitflip_segment<U>(p, data, s);
        return acc;
      },
      [](int64_t a, int64_t b) { return a + b; });
}

at::Tensor bitflip_cpu_(at::Tensor& t, double p01, double p10, int64_t mask, int64_t seed,
                        int64_t layer_id, bool zero_nonfinite) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  BitflipParams p;
  const bool any = check_bitflip(t, p01, p10, mask, layer_id, zero_nonfinite, true, &p);
  TORCH_CHECK_VALUE(t.device().is_cpu(), "bitflip: this kernel takes CPU tensors, got t on ",
                    t.device());
  int64_t flips = 0;
  if (any) {
    p.stream = stream_seed(static_cast<uint64_t>(seed), static_cast<uint64_t>(layer_id));
    at::Tensor work = t.is_contiguous() ? t : t.contiguous();
    void* data = work.data_ptr();
    switch (bitflip_width(t.scalar_type())) {
      case 32: flips = bitflip_all(p, static_cast<uint32_t*>(data)); break;
      case 16: flips = bitflip_all(p, static_cast<uint16_t*>(data)); break;
      default: flips = bitflip_all(p, static_cast<uint8_t*>(data)); break;
    }
    if (!work.is_same(t)) t.copy_(work);
  }
  return at::scalar_tensor(flips, at::TensorOptions().dtype(at::kLong));
}

std::tuple<at::Tensor, at::Tensor> bitflip_cpu(const at::Tensor& t, double p01, double p10,
                                               int64_t mask, int64_t seed, int64_t layer_id,
                                               bool zero_nonfinite) {
  BitflipParams p;
  check_bitflip(t, p01, p10, mask, layer_id, zero_nonfinite, false, &p);  // before the copy
  at::Tensor out = t.clone(at::MemoryFormat::Contiguous);
  at::Tensor flips = bitflip_cpu_(out, p01, p10, mask, seed, layer_id, zero_nonfinite);
  return {out, flips};
}

// Every backend: bump the version counter of the flipped tensor, as ATen's in-place ops do.
at::Tensor bitflip_ad_inplace_or_view(c10::DispatchKeySet keys, at::Tensor& t, double p01,
                                      double p10, int64_t mask, int64_t seed, int64_t layer_id,
                                      bool zero_nonfinite) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("cimext::bitflip_", "")
                             .typed<at::Tensor(at::Tensor&, double, double, int64_t, int64_t,
                                               int64_t, bool)>();
  // Inference tensors (no version counter) are refused by check_bitflip in the kernel.
  at::Tensor flips;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    flips = op.redispatch(keys & c10::after_ADInplaceOrView_keyset, t, p01, p10, mask, seed,
                          layer_id, zero_nonfinite);
  }
  torch::autograd::impl::bump_version(t);
  return flips;
}

}  // namespace

TORCH_LIBRARY_IMPL(cimext, CPU, m) {
  m.impl("bitflip", &bitflip_cpu);
  m.impl("bitflip_", &bitflip_cpu_);
}

TORCH_LIBRARY_IMPL(cimext, ADInplaceOrView, m) {
  m.impl("bitflip_", TORCH_FN(bitflip_ad_inplace_or_view));
}

}  // namespace cimext::cpu
