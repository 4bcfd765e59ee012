// The argument checks of every cimext op (see checks.h), shared by the CPU build, the CUDA build
// and the check-only ops that the Triton launchers and the reference backend call.
#include "checks.h"

#include <ATen/MemoryOverlap.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cmath>
#include <utility>

namespace cimext {

double full_scale(const at::Tensor& weight) {
  if (weight.numel() == 0) return 0.0;
  // Below autograd: an implementation detail of the op, never recorded.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  // aminmax is one pass with no temporary, unlike abs().max(); a NaN anywhere propagates.
  const auto [lo, hi] = at::aminmax(weight.detach());
  return at::maximum(lo.neg(), hi).to(at::kFloat).item<double>();
}

void check_weight(const char* what, const at::Tensor& weight) {
  const auto t = weight.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
                   what, ": weight must be float32, float64, float16 or bfloat16, got ", t);
}

namespace {

void check_like_weight(const char* what, const char* name, const at::Tensor& t,
                       const at::Tensor& weight) {
  TORCH_CHECK_VALUE(t.device() == weight.device(), what, ": ", name, " is on ", t.device(),
                    " but weight is on ", weight.device());
  TORCH_CHECK_TYPE(t.scalar_type() == weight.scalar_type(), what, ": ", name, " dtype ",
                   t.scalar_type(), " must match weight dtype ", weight.scalar_type());
}

bool finite_nonneg(double v) { return std::isfinite(v) && v >= 0; }

// Whether t's memory and values can be looked at: not for meta tensors, nor for tensors with
// symbolic sizes or handled in Python (fake tensors while tracing; the checks also serve the
// fake kernels of sign_step_ and bitflip), which have neither.
bool readable(const at::Tensor& t) {
  return !t.is_meta() && !t.key_set().has(c10::DispatchKey::Python) &&
         !t.unsafeGetTensorImpl()->has_symbolic_sizes_strides();
}

}  // namespace

void check_operands(const char* what, const at::Tensor& x, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias,
                    const std::optional<at::Tensor>& delta) {
  check_weight(what, weight);
  check_like_weight(what, "x", x, weight);
  if (bias.has_value()) {
    check_like_weight(what, "bias", *bias, weight);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), what,
                      ": bias must have shape (", weight.size(0), ",), got ", bias->sizes());
  }
  if (delta.has_value()) {
    check_like_weight(what, "delta", *delta, weight);
    TORCH_CHECK_VALUE(delta->sizes() == weight.sizes(), what, ": delta shape ", delta->sizes(),
                      " must equal weight shape ", weight.sizes());
  }
}

NoiseSpec make_spec(const char* what, const at::Tensor& weight, const at::Tensor& seeds,
                    int64_t layer_id, int64_t kind, std::optional<double> scale_opt,
                    int64_t weight_bits, int64_t bits_per_device, double sigma,
                    at::ArrayRef<double> level_sigma, double verified_sigma, double th,
                    bool verify, const std::optional<at::Tensor>& verify_mask) {
  TORCH_CHECK_TYPE(seeds.scalar_type() == at::kLong, what,
                   ": seeds must be an int64 tensor (seed bit patterns), got ",
                   seeds.scalar_type());
  TORCH_CHECK_VALUE(seeds.dim() == 1, what, ": seeds must be 1-D (S,), got shape ",
                    seeds.sizes());
  TORCH_CHECK_VALUE(seeds.numel() > 0, what, ": seeds must hold at least one seed");
  TORCH_CHECK_VALUE(seeds.is_cpu() || seeds.device() == weight.device(), what, ": seeds is on ",
                    seeds.device(), " but must be on the CPU or on weight's device ",
                    weight.device());
  TORCH_CHECK_VALUE(layer_id >= 0, what, ": layer_id must be >= 0, got ", layer_id);
  TORCH_CHECK_VALUE(kind >= kNoiseNone && kind <= kNoiseRcg, what,
                    ": kind must be 0 (none), 1 (gaussian), 2 (device) or 3 (rcg), got ", kind);
  if (scale_opt.has_value())
    TORCH_CHECK_VALUE(finite_nonneg(*scale_opt), what, ": scale must be finite and >= 0, got ",
                      *scale_opt);
  TORCH_CHECK_VALUE(finite_nonneg(sigma), what, ": sigma must be finite and >= 0, got ", sigma);
  TORCH_CHECK_VALUE(finite_nonneg(verified_sigma), what,
                    ": verified_sigma must be finite and >= 0, got ", verified_sigma);
  TORCH_CHECK_VALUE(finite_nonneg(th), what, ": th must be finite and >= 0, got ", th);
  TORCH_CHECK_VALUE(weight_bits >= 1 && weight_bits <= 24, what,
                    ": weight_bits must be in [1, 24], got ", weight_bits);
  TORCH_CHECK_VALUE(bits_per_device >= 1 && bits_per_device <= 8, what,
                    ": bits_per_device must be in [1, 8], got ", bits_per_device);
  TORCH_CHECK_VALUE(weight_bits % bits_per_device == 0, what, ": bits_per_device (",
                    bits_per_device, ") must divide weight_bits (", weight_bits, ")");
  TORCH_CHECK_VALUE(
      level_sigma.empty() ||
          static_cast<int64_t>(level_sigma.size()) == (int64_t{1} << bits_per_device),
      what, ": level_sigma needs 2**bits_per_device = ", int64_t{1} << bits_per_device,
      " entries, got ", level_sigma.size());
  for (double v : level_sigma)
    TORCH_CHECK_VALUE(finite_nonneg(v), what,
                      ": level_sigma entries must be finite and >= 0, got ", v);
  NoiseSpec spec;
  if (verify_mask.has_value()) {
    const at::Tensor& m = *verify_mask;
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool || m.scalar_type() == at::kByte, what,
                     ": verify_mask must be bool or uint8, got ", m.scalar_type());
    TORCH_CHECK_VALUE(m.device() == weight.device(), what, ": verify_mask is on ", m.device(),
                      " but weight is on ", weight.device());
    TORCH_CHECK_VALUE(m.sizes() == weight.sizes(), what, ": verify_mask shape ", m.sizes(),
                      " must equal weight shape ", weight.sizes());
    spec.verify_mask = m.is_meta() ? m : m.contiguous();
  }
  // The one data read: the full scale, when not given. It rides on a pass the op needs anyway,
  // and a weight holding inf or NaN shows up here as a non-finite maximum.
  double scale = 0.0;
  if (scale_opt.has_value()) {
    scale = *scale_opt;
  } else if (!weight.is_meta()) {
    scale = full_scale(weight);
    TORCH_CHECK_VALUE(std::isfinite(scale), what,
                      ": weight holds inf or NaN (max|weight| = ", scale,
                      "); the noise is relative to max|weight| and needs finite weights");
  }
  spec.scale = scale;
  const bool ok = make_noise_params(&spec.params, static_cast<int>(kind), scale,
                                    static_cast<int>(weight_bits),
                                    static_cast<int>(bits_per_device), sigma, level_sigma.data(),
                                    static_cast<int>(level_sigma.size()), verified_sigma, th,
                                    verify, verify_mask.has_value());
  TORCH_CHECK_VALUE(ok, what, ": invalid device model");
  if (!seeds.is_meta()) {
    // Seeds on a GPU are read back once here (a small blocking copy); the CPU is where callers
    // normally keep them.
    const at::Tensor seeds_cpu = seeds.to(at::kCPU).contiguous();
    const int64_t* sp = seeds_cpu.const_data_ptr<int64_t>();
    spec.seeds.assign(sp, sp + seeds_cpu.numel());
  } else {
    spec.seeds.assign(static_cast<size_t>(seeds.numel()), 0);
  }
  spec.layer_id = static_cast<uint64_t>(layer_id);
  return spec;
}

NoiseSpec check_perturbed_linear(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& delta, bool x_stacked,
                                 const at::Tensor& seeds, int64_t layer_id, int64_t kind,
                                 std::optional<double> scale, int64_t weight_bits,
                                 int64_t bits_per_device, double sigma,
                                 at::ArrayRef<double> level_sigma, double verified_sigma,
                                 double th, bool verify,
                                 const std::optional<at::Tensor>& verify_mask) {
  constexpr const char* what = "perturbed_linear";
  TORCH_CHECK_VALUE(weight.dim() == 2, what, ": weight must be 2-D (out, in), got shape ",
                    weight.sizes());
  check_operands(what, x, weight, bias, delta);
  TORCH_CHECK_VALUE(x.dim() >= (x_stacked ? 2 : 1), what, ": x must have at least ",
                    x_stacked ? 2 : 1, " dims", x_stacked ? " with x_stacked" : "",
                    ", got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(-1) == weight.size(1), what, ": x.shape[-1]=", x.size(-1),
                    " must equal weight.shape[1]=", weight.size(1));
  if (x_stacked && seeds.dim() == 1)
    TORCH_CHECK_VALUE(x.size(0) == seeds.size(0), what, ": with x_stacked, x.shape[0]=",
                      x.size(0), " must equal the number of seeds ", seeds.size(0));
  return make_spec(what, weight, seeds, layer_id, kind, scale, weight_bits, bits_per_device,
                   sigma, level_sigma, verified_sigma, th, verify, verify_mask);
}

NoiseSpec check_perturbed_conv2d(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& delta, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups, bool x_stacked, const at::Tensor& seeds,
                                 int64_t layer_id, int64_t kind, std::optional<double> scale,
                                 int64_t weight_bits, int64_t bits_per_device, double sigma,
                                 at::ArrayRef<double> level_sigma, double verified_sigma,
                                 double th, bool verify,
                                 const std::optional<at::Tensor>& verify_mask) {
  constexpr const char* what = "perturbed_conv2d";
  TORCH_CHECK_VALUE(weight.dim() == 4, what,
                    ": weight must be 4-D (out, in/groups, kh, kw), got shape ", weight.sizes());
  check_operands(what, x, weight, bias, delta);
  TORCH_CHECK_VALUE(groups >= 1, what, ": groups must be >= 1, got ", groups);
  TORCH_CHECK_VALUE(stride.size() == 2 && std::all_of(stride.begin(), stride.end(),
                                                      [](int64_t v) { return v >= 1; }),
                    what, ": stride must be two ints >= 1, got ", stride);
  TORCH_CHECK_VALUE(padding.size() == 2 && std::all_of(padding.begin(), padding.end(),
                                                       [](int64_t v) { return v >= 0; }),
                    what, ": padding must be two ints >= 0, got ", padding);
  TORCH_CHECK_VALUE(dilation.size() == 2 && std::all_of(dilation.begin(), dilation.end(),
                                                        [](int64_t v) { return v >= 1; }),
                    what, ": dilation must be two ints >= 1, got ", dilation);
  TORCH_CHECK_VALUE(x.dim() == (x_stacked ? 5 : 4), what, ": x must be ",
                    x_stacked ? "5-D (S, N, C, H, W) with x_stacked" : "4-D (N, C, H, W)",
                    ", got shape ", x.sizes());
  if (x_stacked && seeds.dim() == 1)
    TORCH_CHECK_VALUE(x.size(0) == seeds.size(0), what, ": with x_stacked, x.shape[0]=",
                      x.size(0), " must equal the number of seeds ", seeds.size(0));
  const int64_t off = x_stacked ? 1 : 0;
  const int64_t cin = x.size(off + 1);
  TORCH_CHECK_VALUE(cin == weight.size(1) * groups, what, ": x has ", cin,
                    " channels but weight expects in/groups * groups = ",
                    weight.size(1) * groups);
  TORCH_CHECK_VALUE(weight.size(0) % groups == 0, what, ": out channels ", weight.size(0),
                    " must be divisible by groups ", groups);
  for (int64_t d = 0; d < 2; ++d) {
    const int64_t span = dilation[d] * (weight.size(2 + d) - 1) + 1;
    const int64_t padded = x.size(off + 2 + d) + 2 * padding[d];
    TORCH_CHECK_VALUE(span <= padded, what, ": the kernel (dilated size ", span,
                      ") does not fit the padded input (size ", padded, ") in spatial dim ", d);
  }
  return make_spec(what, weight, seeds, layer_id, kind, scale, weight_bits, bits_per_device,
                   sigma, level_sigma, verified_sigma, th, verify, verify_mask);
}

void check_noise_out(const at::Tensor& weight, int64_t n_seeds, const at::Tensor& out) {
  TORCH_CHECK_VALUE(out.device() == weight.device(), "noise: out is on ", out.device(),
                    " but weight is on ", weight.device());
  TORCH_CHECK_TYPE(out.scalar_type() == weight.scalar_type(), "noise: out dtype ",
                   out.scalar_type(), " must match weight dtype ", weight.scalar_type());
  std::vector<int64_t> shape{n_seeds};
  shape.insert(shape.end(), weight.sizes().begin(), weight.sizes().end());
  TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef(shape), "noise: out must have shape ",
                    at::IntArrayRef(shape), " (seeds, *weight.shape), got ", out.sizes());
  // An inference tensor has no version counter: it may only be written inside inference mode,
  // as ATen's ops allow.
  TORCH_CHECK(!out.is_inference() || c10::InferenceMode::is_enabled(),
              "noise: out is an inference tensor; writing into it is only allowed inside "
              "torch.inference_mode()");
  // Later seeds read the weight after earlier ones were written: out must not share its memory.
  if (!out.is_meta())
    TORCH_CHECK_VALUE(at::get_overlap_status(out, weight) == at::MemOverlapStatus::No,
                      "noise: out must not overlap weight");
}

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
                     at::ArrayRef<double> bounds, const BoundTensors& bound_tensors) {
  TORCH_CHECK_VALUE(deltas.size() == grads.size() && deltas.size() == bounds.size(),
                    "sign_step_: deltas, grads and bounds need one entry per tensor, got ",
                    deltas.size(), " deltas, ", grads.size(), " grads and ", bounds.size(),
                    " bounds");
  TORCH_CHECK_VALUE(!bound_tensors.has_value() || bound_tensors->size() == deltas.size(),
                    "sign_step_: bound_tensors needs one entry (a tensor or None) per delta, got ",
                    bound_tensors.has_value() ? bound_tensors->size() : 0, " for ",
                    deltas.size(), " deltas");
  TORCH_CHECK_VALUE(finite_nonneg(eta), "sign_step_: eta must be finite and >= 0, got ", eta);
  const bool inference_mode = c10::InferenceMode::is_enabled();
  // Byte spans of every non-empty delta and bound tensor, to find shared memory.
  std::vector<std::pair<std::pair<uintptr_t, uintptr_t>, size_t>> spans, bound_spans;
  std::vector<size_t> bound_to_read;
  for (size_t i = 0; i < deltas.size(); ++i) {
    const at::Tensor& d = deltas[i];
    const at::Tensor& g = grads[i];
    TORCH_CHECK_VALUE(finite_nonneg(bounds[i]), "sign_step_: bounds[", i,
                      "] must be finite and >= 0, got ", bounds[i]);
    TORCH_CHECK_VALUE(d.device() == deltas[0].device(), "sign_step_: deltas[", i, "] is on ",
                      d.device(), " but deltas[0] is on ", deltas[0].device(),
                      " (all deltas must be on one device)");
    TORCH_CHECK_VALUE(g.device() == d.device(), "sign_step_: grads[", i, "] is on ", g.device(),
                      " but deltas[", i, "] is on ", d.device());
    const auto t = d.scalar_type();
    TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
                     "sign_step_: deltas[", i,
                     "] must be float32, float64, float16 or bfloat16, got ", t);
    TORCH_CHECK_TYPE(g.scalar_type() == t, "sign_step_: grads[", i, "] dtype ", g.scalar_type(),
                     " must match deltas[", i, "] dtype ", t);
    TORCH_CHECK_VALUE(g.sym_sizes() == d.sym_sizes(), "sign_step_: grads[", i, "] shape ",
                      g.sym_sizes(), " must equal deltas[", i, "] shape ", d.sym_sizes());
    // Outside inference mode an inference tensor has no version counter: refuse it before
    // anything is written, as ATen's in-place ops do.
    TORCH_CHECK(inference_mode || !d.is_inference(), "sign_step_: deltas[", i,
                "] is an inference tensor; in-place updates of it are only allowed inside "
                "torch.inference_mode()");
    const at::Tensor b = bound_tensor(bound_tensors, i);
    if (b.defined()) {
      TORCH_CHECK_VALUE(b.device() == d.device(), "sign_step_: bound_tensors[", i, "] is on ",
                        b.device(), " but deltas[", i, "] is on ", d.device());
      TORCH_CHECK_TYPE(b.scalar_type() == t, "sign_step_: bound_tensors[", i, "] dtype ",
                       b.scalar_type(), " must match deltas[", i, "] dtype ", t);
      TORCH_CHECK_VALUE(b.sym_sizes() == d.sym_sizes(), "sign_step_: bound_tensors[", i,
                        "] shape ", b.sym_sizes(), " must equal deltas[", i, "] shape ",
                        d.sym_sizes());
    }
    if (!readable(d) || (b.defined() && !readable(b)) || d.numel() == 0) continue;
    TORCH_CHECK_VALUE(at::has_internal_overlap(d) != at::MemOverlap::Yes, "sign_step_: deltas[",
                      i, "] has elements that share memory (an expanded view?); it cannot be ",
                      "written");
    spans.push_back({byte_span(d), i});
    if (b.defined()) {
      bound_spans.push_back({byte_span(b), i});
      bound_to_read.push_back(i);
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
  // Last, the one check that reads data: a NaN bound would let NaN through the clamp's selects.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  for (size_t i : bound_to_read) {
    const at::Tensor b = bound_tensor(bound_tensors, i);
    TORCH_CHECK_VALUE(at::isfinite(b).logical_and(b.ge(0)).all().item<bool>(),
                      "sign_step_: bound_tensors[", i, "] must be finite and >= 0 everywhere ",
                      "(it has a negative, NaN or infinite entry)");
  }
}

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

namespace {
uint32_t bitflip_exponent_mask(at::ScalarType t) {
  return t == at::kFloat      ? 0x7F800000u
         : t == at::kHalf     ? 0x7C00u
         : t == at::kBFloat16 ? 0x7F80u
                              : 0u;
}
}  // namespace

bool check_bitflip(const at::Tensor& t, double p01, double p10, int64_t mask, int64_t layer_id,
                   bool zero_nonfinite, bool in_place, BitflipParams* params) {
  const char* what = in_place ? "bitflip_" : "bitflip";
  const int width = bitflip_width(t.scalar_type());
  TORCH_CHECK_TYPE(width > 0, what,
                   ": t dtype must be one of float32, float16, bfloat16, int8, uint8, "
                   "int16, int32, got ",
                   t.scalar_type());
  const int64_t full = (int64_t(1) << width) - 1;
  TORCH_CHECK_VALUE(mask >= 0 && mask <= full, what, ": mask must be in [0, ", full, "] for ",
                    t.scalar_type(), ", got ", mask);
  TORCH_CHECK_VALUE(p01 >= 0.0 && p01 <= 1.0, what,
                    ": p01 must be a probability in [0, 1], got ", p01);
  TORCH_CHECK_VALUE(p10 >= 0.0 && p10 <= 1.0, what,
                    ": p10 must be a probability in [0, 1], got ", p10);
  TORCH_CHECK_VALUE(layer_id >= 0, what, ": layer_id must be >= 0, got ", layer_id);
  if (in_place) {
    TORCH_CHECK(c10::InferenceMode::is_enabled() || !t.is_inference(),
                "bitflip_: t is an inference tensor; in-place updates of it are only allowed "
                "inside torch.inference_mode()");
    if (readable(t) && t.numel() > 0)
      TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes,
                        "bitflip_: t has elements that share memory (an expanded view?); it "
                        "cannot be written");
  }
  if (params == nullptr) return false;  // checks only (the check op, fake kernels)
  return make_bitflip_params(params, p01, p10, static_cast<uint32_t>(mask), width, t.numel(),
                             zero_nonfinite ? bitflip_exponent_mask(t.scalar_type()) : 0u);
}

}  // namespace cimext
