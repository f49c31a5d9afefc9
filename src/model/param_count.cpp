#include "model/param_count.h"

namespace moeforge {

ParamCounts count_params(const ModelConfig& c) {
  ParamCounts p;
  const int64_t H = c.hidden_size, I = c.intermediate_size, L = c.num_layers;
  const int64_t E = c.moe.num_experts, K = c.moe.num_experts_per_tok;
  p.embedding = c.vocab_size * H;
  // q_proj [q_dim, H], k_proj/v_proj [kv_dim, H], o_proj [H, q_dim], no biases.
  p.attention = L * (c.q_dim() * H + 2 * c.kv_dim() * H + H * c.q_dim());
  p.router = L * E * H;
  p.per_expert = 3 * H * I;
  p.experts = L * E * p.per_expert;
  p.norms = L * 2 * H + H;
  p.lm_head = c.tie_word_embeddings ? 0 : c.vocab_size * H;
  p.total = p.embedding + p.attention + p.router + p.experts + p.norms + p.lm_head;
  p.active = p.total - p.experts + L * K * p.per_expert;
  return p;
}

MemoryEstimate estimate_memory(const ParamCounts& p) {
  const double n = static_cast<double>(p.total);
  MemoryEstimate m;
  m.weights_bf16 = 2 * n;
  m.weights_fp32 = 4 * n;
  m.grads_bf16 = 2 * n;
  m.grads_fp32 = 4 * n;
  m.adamw_fp32 = 8 * n;
  m.mixed_bf16_total = (4 + 4 + 8 + 2) * n;
  m.fp32_total = (4 + 4 + 8) * n;
  return m;
}

}  // namespace moeforge
