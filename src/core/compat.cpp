#include "core/compat.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#ifdef MOEFORGE_WITH_CUDA
#include <ATen/cuda/CUDAGeneratorImpl.h>
#endif
#include <ATen/Parallel.h>

#include <cmath>
#include <mutex>
#include <thread>

namespace moeforge::compat {

std::string torch_version() {
  return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
         std::to_string(TORCH_VERSION_PATCH);
}

at::Tensor attention_reference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& allowed_mask) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
  const int64_t T = q.size(-2), S = k.size(-2);
  at::Tensor allowed = allowed_mask;
  if (!allowed.defined()) allowed = at::ones({T, S}, q.options().dtype(at::kBool)).tril(S - T);
  if (q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf) {
    // Reduced precision: Q K^T and P V are bf16 matmuls (fp32 accumulation inside), the scale goes into q before
    // the matmul and the mask is added as 0 / -inf. The softmax runs on the bf16 scores: LibTorch's CPU kernel
    // converts each row to fp32, computes in fp32 and rounds the probabilities to bf16 once, which is what the
    // fp32 softmax followed by a cast to bf16 for P V gave (bit for bit, measured on rows of 256 to 32768), and
    // its backward rounds the scores' gradient to bf16 once, as the cast before Q K^T's backward did. It skips
    // the [B, heads, T, T] fp32 copies and three casts of them per layer (LibTorch 1.13, AMD EPYC, 2 cores:
    // 35.6 -> 10.1 ms forward and backward for 16 x 4 x 256 x 256).
    auto bias = at::zeros(allowed.sizes(), q.options())
                    .masked_fill_(allowed.logical_not(), -std::numeric_limits<double>::infinity());
    auto scores = at::add(at::matmul(q * scale, k.transpose(-2, -1)), bias);
    return at::matmul(at::softmax(scores, -1), v);
  }
  // Softmax in fp32 at least (fp64 for fp64 inputs).
  auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto scores = at::matmul(q.to(acc), k.to(acc).transpose(-2, -1)) * scale;
  scores = scores.masked_fill(allowed.logical_not(), -std::numeric_limits<double>::infinity());
  auto probs = at::softmax(scores, -1);
  return at::matmul(probs, v.to(acc)).to(q.scalar_type());
}

at::Tensor scaled_dot_product_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& allowed_mask) {
#if MOEFORGE_HAS_SDPA
  if (!allowed_mask.defined()) {
    return at::scaled_dot_product_attention(q, k, v, /*attn_mask=*/{}, /*dropout_p=*/0.0, /*is_causal=*/true);
  }
  return at::scaled_dot_product_attention(q, k, v, allowed_mask, /*dropout_p=*/0.0, /*is_causal=*/false);
#else
  return attention_reference(q, k, v, allowed_mask);
#endif
}

at::Tensor uniform_noise(at::IntArrayRef sizes, double lo, double hi, uint64_t seed, const at::TensorOptions& options) {
#ifdef MOEFORGE_WITH_CUDA
  if (options.device().is_cuda()) {
    at::Generator g = at::cuda::detail::createCUDAGenerator(options.device().index());
    {
      std::lock_guard<std::mutex> lock(g.mutex());
      g.set_current_seed(seed);
    }
    return at::empty(sizes, options).uniform_(lo, hi, g);
  }
#endif
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::empty(sizes, options.device(at::kCPU)).uniform_(lo, hi, g).to(options.device());
}

int configure_threads(int requested) {
  int n = requested;
  if (n <= 0) {
    n = static_cast<int>(std::thread::hardware_concurrency());
    if (n <= 0) n = 1;
  }
  at::set_num_threads(n);
  return n;
}

}  // namespace moeforge::compat
