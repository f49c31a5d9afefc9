// Every difference between the LibTorch versions we build against lives here:
// Debian's 1.13 (CPU, Gloo) and the 2.x that ships in the PyTorch wheel (CUDA, NCCL).
//   - scaled_dot_product_attention: 2.0+ (explicit softmax path on 1.13)
//   - at::_grouped_mm: 2.8+ (per-expert loop otherwise)
//   - c10d Backend vs ProcessGroup base class: 2.0+
//   - a CUDA generator of our own (router jitter on the device): CUDA builds only
#pragma once
#include <ATen/core/Tensor.h>
#include <torch/version.h>

#include <string>

#define MOEFORGE_TORCH_AT_LEAST(major, minor) \
  (TORCH_VERSION_MAJOR > (major) || (TORCH_VERSION_MAJOR == (major) && TORCH_VERSION_MINOR >= (minor)))

#define MOEFORGE_HAS_SDPA MOEFORGE_TORCH_AT_LEAST(2, 0)
#define MOEFORGE_HAS_GROUPED_MM MOEFORGE_TORCH_AT_LEAST(2, 8)
#define MOEFORGE_HAS_C10D_BACKEND MOEFORGE_TORCH_AT_LEAST(2, 0)

namespace moeforge::compat {

// "1.13.1" etc.
std::string torch_version();

// Attention over q [B,Nh,T,D], k/v [B,Nh,S,D] (kv heads already repeated).
// allowed_mask: bool, broadcastable to [B,Nh,T,S], true where attention is allowed; when
// undefined, plain causal attention is used. Uses SDPA on LibTorch 2.x (flash / memory-efficient
// kernels where the shape allows), an explicit softmax(QK^T/sqrt(d))V path on 1.13.
at::Tensor scaled_dot_product_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& allowed_mask);

// The explicit path, also used as the reference in tests.
at::Tensor attention_reference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& allowed_mask);

// Uniform noise U(lo, hi) of `sizes` on `options`' device, from a generator of that device seeded with `seed`
// (a fresh CUDA generator with a CUDA LibTorch, MOEFORGE_WITH_CUDA; compiled only there).
at::Tensor uniform_noise(at::IntArrayRef sizes, double lo, double hi, uint64_t seed, const at::TensorOptions& options);

// Intra-op threads: `requested` > 0 wins, else the number of cores.
int configure_threads(int requested);

}  // namespace moeforge::compat
