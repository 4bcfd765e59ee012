// All cimext op schemas (DESIGN section 5). Backends register implementations in their own files
// (csrc/cpu/*.cpp with TORCH_LIBRARY_IMPL(cimext, CPU, m), csrc/cuda/*.cu with CUDA), so a
// CPU-only build needs no #ifdef. `import cimext._C` runs the registrations.
#include <Python.h>
#include <torch/library.h>

// The noise spec shared by noise / perturbed_linear / perturbed_conv2d. kind: 0 none (δ only),
// 1 gaussian (ΔW = scale * sigma * ε), 2 device (DESIGN section 3), 3 right-censored Gaussian
// (ΔW = scale * sigma * min(ε, th)). seeds: a 1-D int64 tensor (on the CPU or on weight's
// device) of 64-bit device-instance seeds as int64 bit patterns; a tensor rather than int[] so
// that a compiled graph takes new seeds as data (no recompile per seed, none per sampled
// forward). scale: the full scale s_l; None computes max|weight| (as float32) inside the op, so
// that no caller has to turn a tensor into a Python number. (`kind`, not `mode`: torch.compile's
// functionalization of the mutating noise_out passes a `mode` argument of its own.)
#define CIMEXT_NOISE_ARGS                                                                   \
  "Tensor seeds, int layer_id, int kind, float? scale, int weight_bits, int bits_per_device, " \
  "float sigma, float[] level_sigma, float verified_sigma, float th, bool verify, "        \
  "Tensor? verify_mask"

TORCH_LIBRARY(cimext, m) {
  // ΔW for every seed: shape (S, *weight.shape), dtype of weight.
  m.def("noise(Tensor weight, " CIMEXT_NOISE_ARGS ") -> Tensor");
  // noise written into `out` (shape (S, *weight.shape), dtype and device of weight); checked
  // before anything is written.
  m.def("noise_out(Tensor weight, " CIMEXT_NOISE_ARGS ", Tensor(a!) out) -> ()");
  // Stack over seeds of linear(x_s, weight + delta + ΔW(s), bias): shape (S, ..., out).
  m.def("perturbed_linear(Tensor x, Tensor weight, Tensor? bias, Tensor? delta, bool x_stacked, " CIMEXT_NOISE_ARGS
        ") -> Tensor");
  // Stack over seeds of conv2d(x_s, weight + delta + ΔW(s), bias, ...): shape (S, N, C_out, H, W).
  m.def("perturbed_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor? delta, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups, bool x_stacked, " CIMEXT_NOISE_ARGS
        ") -> Tensor");
  // For every i: deltas[i] <- clamp(deltas[i] - eta * sign(grads[i]), -b_i, b_i), in place
  // (sign(0) = 0), with b_i = bound_tensors[i] (per element, like deltas[i]) where given and
  // bounds[i] otherwise. One step of F-LWC / weight PGD over all layers' perturbations.
  m.def("sign_step_(Tensor(a!)[] deltas, Tensor[] grads, float eta, float[] bounds, "
        "Tensor?[]? bound_tensors=None) -> ()");
  // A copy of t with bits of its raw representation flipped, and the number of flips (int64,
  // 0-dim): every bit in `mask` independently, 0 -> 1 with probability p01 and 1 -> 0 with p10.
  // seed is a 64-bit seed as an int64 bit pattern; stream stream_seed(seed, layer_id).
  m.def("bitflip(Tensor t, float p01, float p10, int mask, int seed, int layer_id, "
        "bool zero_nonfinite) -> (Tensor, Tensor)");
  // The same in place; returns the number of flips.
  m.def("bitflip_(Tensor(a!) t, float p01, float p10, int mask, int seed, int layer_id, "
        "bool zero_nonfinite) -> Tensor");
  // Σ over leading dims of s_out[..., o] · x[..., i]²: shape (out, in).
  m.def("hdiag_linear(Tensor x, Tensor s_out) -> Tensor");
  // Σ over batch and output positions of s_out ⊗ unfold(x)²: shape (O, C/groups, kh, kw).
  m.def("hdiag_conv2d(Tensor x, Tensor s_out, int[2] kernel_size, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups) -> Tensor");
  // s_out (..., out) times W² (out, in): shape (..., in).
  m.def("curv_backward_linear(Tensor s_out, Tensor weight) -> Tensor");
  // The transposed convolution of s_out (N, O, OH, OW) with W²: shape (N, C, H, W) for
  // input_size = (H, W).
  m.def("curv_backward_conv2d(Tensor s_out, Tensor weight, int[2] input_size, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups) -> Tensor");
  // Check-only ops (csrc/common/check_ops.cpp): the argument checks of the op of the same name
  // without the op, raising exactly what the op raises. The Triton launchers and the reference
  // backend call them first, so every backend validates in one place. The noise ones return the
  // full scale used (the given scale, or max|weight|) as a 0-dim float64 tensor on the CPU (a
  // tensor, not a float, so that a traced graph takes it as data), so it is computed once.
  m.def("_check_noise(Tensor weight, " CIMEXT_NOISE_ARGS ") -> Tensor");
  m.def("_check_noise_out(Tensor weight, " CIMEXT_NOISE_ARGS ", Tensor out) -> Tensor");
  m.def("_check_perturbed_linear(Tensor x, Tensor weight, Tensor? bias, Tensor? delta, "
        "bool x_stacked, " CIMEXT_NOISE_ARGS ") -> Tensor");
  m.def("_check_perturbed_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor? delta, "
        "int[2] stride, int[2] padding, int[2] dilation, int groups, bool x_stacked, "
        CIMEXT_NOISE_ARGS ") -> Tensor");
  m.def("_check_sign_step_(Tensor[] deltas, Tensor[] grads, float eta, float[] bounds, "
        "Tensor?[]? bound_tensors=None) -> ()");
  m.def("_check_bitflip(Tensor t, float p01, float p10, int mask, int seed, int layer_id, "
        "bool zero_nonfinite, bool in_place) -> ()");
  // Raw Philox streams (debugging, tests): values j0 .. j0 + n - 1 of stream `stream` (a Philox
  // key as an int64 bit pattern), float32 normals (randn4x order) or uniforms (rand4x order).
  m.def("_philox_normals(int stream, int j0, int n) -> Tensor");
  m.def("_philox_uniforms(int stream, int j0, int n) -> Tensor");
  // Debug/test hooks of the CPU normal generator: _set_cpu_simd caps its SIMD level (0 scalar,
  // 1 AVX2, 2 AVX-512, the default) and returns the previous cap; _cpu_simd is the level in use
  // (the cap, lowered to what the processor supports). Every level gives bit-identical normals.
  m.def("_set_cpu_simd(int level) -> int");
  m.def("_cpu_simd() -> int");
}

extern "C" {
// An empty module: importing cimext._C loads the library and runs the registrations above.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
