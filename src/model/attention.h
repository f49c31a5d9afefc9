#pragma once
#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>

#include "model/config.h"
#include "model/kv_cache.h"
#include "model/lora.h"

namespace moeforge {

// Which key positions each query may attend to, for a batch [B, T]:
// causal, optionally within a sliding window (a token sees at most `window` positions,
// itself included), optionally only inside its own segment (packed documents).
// Returns an undefined tensor for plain causal attention (fast path), else bool [B, 1, T, T].
at::Tensor build_attention_mask(int64_t B, int64_t T, std::optional<int64_t> window, const at::Tensor& segment_ids_BT,
                                const at::Device& device);

// Grouped-query attention with RoPE, no biases. Parameter names as in HF Mixtral
// (self_attn.q_proj / k_proj / v_proj / o_proj).
class AttentionImpl : public torch::nn::Module {
 public:
  explicit AttentionImpl(const ModelConfig& cfg);
  // x [B, T, H]; cos/sin [B, T, D]; mask from build_attention_mask (may be undefined).
  torch::Tensor forward(const torch::Tensor& x_BTH, const torch::Tensor& cos, const torch::Tensor& sin,
                        const torch::Tensor& mask);

  // Incremental decoding: x [B, n, H] holds the tokens at positions pos_new [n]; attends to the cached
  // keys and to the new ones (causal, within `window`), then stores the new keys and values.
  torch::Tensor forward_cached(const torch::Tensor& x_BTH, const torch::Tensor& cos, const torch::Tensor& sin,
                               const torch::Tensor& pos_new, std::optional<int64_t> window, LayerKVCache& cache);

  // Expands kv heads [B, kv, T, D] to [B, kv * groups, T, D] (each kv head shared by `groups` query heads).
  static torch::Tensor repeat_kv(const torch::Tensor& x, int64_t groups);

  torch::nn::Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};
  int64_t num_heads, num_kv_heads, head_dim;
  // Fine-tuning: adapters and quantised base weights of the projections (model/finetune.h attaches them).
  LinearExtras q_extras, k_extras, v_extras, o_extras;
  std::shared_ptr<LoraRuntime> lora_rt;

 private:
  torch::Tensor proj(const torch::Tensor& x, const torch::nn::Linear& l, const LinearExtras& ex);
};
TORCH_MODULE(Attention);

}  // namespace moeforge
