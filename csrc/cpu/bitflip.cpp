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
#include "bitflip_common.h"

namespace cimext::cpu {

int bitflip_width(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
    case at::kInt:
      return 32;
    case at::kHalf:
    case at::kBFloat16:
    case at::kShort:
      return 16;
    case at::kChar:
    case at::kByte:
      return 8;
    default:
      return 0;
  }
}

uint32_t bitflip_exponent_mask(at::ScalarType t) {
  return t == at::kFloat ? 0x7F800000u : t == at::kHalf ? 0x7C00u : t == at::kBFloat16 ? 0x7F80u : 0u;
}

bool check_bitflip(const at::Tensor& t, double p01, double p10, int64_t mask, int64_t layer_id,
                   bool zero_nonfinite, BitflipParams* params) {
  // TypeError / ValueError in Python, with the messages of cimext.reference.check_bitflip.
  const int width = bitflip_width(t.scalar_type());
  TORCH_CHECK_TYPE(width > 0,
                   "bitflip: dtype must be one of float32, float16, bfloat16, int8, uint8, "
                   "int16, int32, got ", t.scalar_type());
  const int64_t full = (int64_t(1) << width) - 1;
  TORCH_CHECK_VALUE(mask >= 0 && mask <= full, "mask must be in [0, ", full, "] for ",
                    t.scalar_type(), ", got ", mask);
  TORCH_CHECK_VALUE(p01 >= 0.0 && p01 <= 1.0,
                    "bitflip: p01 must be a probability in [0, 1], got ", p01);
  TORCH_CHECK_VALUE(p10 >= 0.0 && p10 <= 1.0,
                    "bitflip: p10 must be a probability in [0, 1], got ", p10);
  TORCH_CHECK_VALUE(layer_id >= 0, "bitflip: layer_id must be >= 0, got ", layer_id);
  return make_bitflip_params(params, p01, p10, static_cast<uint32_t>(mask), width, t.numel(),
                             zero_nonfinite ? bitflip_exponent_mask(t.scalar_type()) : 0u);
}

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
  const bool any = check_bitflip(t, p01, p10, mask, layer_id, zero_nonfinite, &p);
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
  check_bitflip(t, p01, p10, mask, layer_id, zero_nonfinite, &p);  // before the copy
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
  TORCH_CHECK(!t.is_inference(), "bitflip_: t is an inference tensor; in-place updates of it "
              "are only allowed inside torch.inference_mode()");
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

TORCH_LIBRARY_FRAGMENT(cimext, m) {
  // A copy of t with bits of its raw representation flipped, and the number of flips (int64,
  // 0-dim): every bit in `mask` independently, 0 -> 1 with probability p01 and 1 -> 0 with p10.
  // seed is a 64-bit seed as an int64 bit pattern; stream stream_seed(seed, layer_id).
  m.def("bitflip(Tensor t, float p01, float p10, int mask, int seed, int layer_id, "
        "bool zero_nonfinite) -> (Tensor, Tensor)");
  // The same in place; returns the number of flips.
  m.def("bitflip_(Tensor(a!) t, float p01, float p10, int mask, int seed, int layer_id, "
        "bool zero_nonfinite) -> Tensor");
}

TORCH_LIBRARY_IMPL(cimext, CPU, m) {
  m.impl("bitflip", &bitflip_cpu);
  m.impl("bitflip_", &bitflip_cpu_);
}

TORCH_LIBRARY_IMPL(cimext, ADInplaceOrView, m) {
  m.impl("bitflip_", TORCH_FN(bitflip_ad_inplace_or_view));
}

}  // namespace cimext::cpu
