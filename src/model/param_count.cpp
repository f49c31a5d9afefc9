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
  p.shared = L * (3 * H * c.shared_intermediate_size() + (c.moe.num_shared_experts > 0 && c.moe.shared_expert_gate ? H : 0));
  p.total = p.embedding + p.attention + p.router + p.experts + p.shared + p.norms + p.lm_head;
  p.active = p.total - p.experts + L * K * p.per_expert;
  return p;
}

std::vector<std::pair<std::string, std::vector<int64_t>>> parameter_shapes(const ModelConfig& c) {
  const int64_t H = c.hidden_size, I = c.intermediate_size, q = c.q_dim(), kv = c.kv_dim();
  std::vector<std::pair<std::string, std::vector<int64_t>>> out;
  out.push_back({"model.embed_tokens.weight", {c.vocab_size, H}});
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string pre = "model.layers." + std::to_string(l) + ".";
    out.push_back({pre + "self_attn.q_proj.weight", {q, H}});
    out.push_back({pre + "self_attn.k_proj.weight", {kv, H}});
    out.push_back({pre + "self_attn.v_proj.weight", {kv, H}});
    out.push_back({pre + "self_attn.o_proj.weight", {H, q}});
    out.push_back({pre + "block_sparse_moe.gate.weight", {c.moe.num_experts, H}});
    for (int64_t e = 0; e < c.moe.num_experts; ++e) {
      const std::string ex = pre + "block_sparse_moe.experts." + std::to_string(e) + ".";
      out.push_back({ex + "w1.weight", {I, H}});
      out.push_back({ex + "w2.weight", {H, I}});
      out.push_back({ex + "w3.weight", {I, H}});
    }
    if (c.moe.num_shared_experts > 0) {
      const int64_t S = c.shared_intermediate_size();
      out.push_back({pre + "block_sparse_moe.shared_expert.w1.weight", {S, H}});
      out.push_back({pre + "block_sparse_moe.shared_expert.w2.weight", {H, S}});
      out.push_back({pre + "block_sparse_moe.shared_expert.w3.weight", {S, H}});
      if (c.moe.shared_expert_gate) out.push_back({pre + "block_sparse_moe.shared_expert_gate.weight", {1, H}});
    }
    out.push_back({pre + "input_layernorm.weight", {H}});
    out.push_back({pre + "post_attention_layernorm.weight", {H}});
  }
  out.push_back({"model.norm.weight", {H}});
  if (!c.tie_word_embeddings) out.push_back({"lm_head.weight", {c.vocab_size, H}});
  return out;
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

namespace moeforge {

FinetuneEstimate estimate_finetune(const ModelConfig& c, const FinetuneSpec& ft, bool bf16) {
  const ParamCounts p = count_params(c);
  const LoraSpec& l = ft.lora;
  const int64_t H = c.hidden_size, I = c.intermediate_size, L = c.num_layers, E = c.moe.num_experts;
  const int64_t q = c.q_dim(), kv = c.kv_dim();
  auto adapter = [&](const char* t, int64_t in, int64_t out) { return l.targets_module(t) ? l.rank_of(t) * (in + out) : 0; };
  const int64_t per_layer = adapter("q_proj", H, q) + adapter("k_proj", H, kv) + adapter("v_proj", H, kv) +
                            adapter("o_proj", q, H) + adapter("gate", H, E) +
                            E * (adapter("w1", H, I) + adapter("w2", I, H) + adapter("w3", H, I));
  FinetuneEstimate f;
  f.trainable = L * per_layer + (c.tie_word_embeddings ? 0 : adapter("lm_head", H, c.vocab_size));
  f.frozen_linear = p.attention + p.experts;
  const double rest = static_cast<double>(p.total - f.frozen_linear) * 4;  // embeddings, head, norms, router: fp32
  const double n = static_cast<double>(f.frozen_linear);
  if (ft.quantized()) {
    const double bs = static_cast<double>(ft.quant.block_size);
    const double codes = ft.quant.type == QuantType::NF4 ? 0.5 : 1.0;
    // absmax per block: fp32, or (double quantisation) int8 + one fp32 scale per 256 blocks
    f.quant_overhead = n * (ft.quant.double_quant ? 1.0 / bs + 4.0 / (bs * 256) : 4.0 / bs);
    f.base_bytes = n * codes + f.quant_overhead + rest;
  } else {
    f.base_bytes = n * (bf16 ? 2 : 4) + rest;
  }
  const double t = static_cast<double>(f.trainable);
  f.adapter_bytes = 4 * t;
  f.grad_bytes = 4 * t;
  f.optimizer_bytes = 8 * t;
  f.total = f.base_bytes + f.adapter_bytes + f.grad_bytes + f.optimizer_bytes;
  return f;
}

}  // namespace moeforge
