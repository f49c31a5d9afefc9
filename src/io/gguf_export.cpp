#include "io/gguf_export.h"

#include <ATen/ATen.h>
#include <unistd.h>

#include <filesystem>

#include "core/error.h"

namespace moeforge::io {

namespace fs = std::filesystem;

at::Tensor permute_rope_rows(const at::Tensor& w, int64_t n_heads) {
  const int64_t rows = w.size(0), D = rows / n_heads;
  MF_CHECK(rows % n_heads == 0 && D % 2 == 0, "rows split into heads of even size");
  // [heads, 2 (half), D/2, ...] -> [heads, D/2, 2, ...]: row (h, half, i) moves to (h, i, half).
  std::vector<int64_t> shape{n_heads, 2, D / 2};
  for (int64_t d = 1; d < w.dim(); ++d) shape.push_back(w.size(d));
  return w.reshape(shape).transpose(1, 2).reshape(w.sizes()).contiguous();
}

void export_gguf(const ModelConfig& c, const std::map<std::string, at::Tensor>& weights, const GgufVocab& vocab,
                 const std::string& path, const std::string& dtype) {
  GgmlType t = dtype == "f32" ? GgmlType::F32 : dtype == "f16" ? GgmlType::F16 : dtype == "bf16" ? GgmlType::BF16
                                                                                                  : GgmlType(999);
  if (static_cast<uint32_t>(t) == 999) throw UserError("--dtype for gguf must be f32, f16 or bf16, got '" + dtype + "'");
  if (fs::exists(path)) throw UserError(path + ": already exists; choose a new --out file");
  auto w = [&](const std::string& n) -> const at::Tensor& {
    auto it = weights.find(n);
    MF_CHECK(it != weights.end(), "weight " + n);
    return it->second;
  };
  GgufWriter g;
  g.add_string("general.architecture", "llama");
  g.add_string("general.name", c.name);
  g.add_u32("general.file_type", t == GgmlType::F32 ? 0 : t == GgmlType::F16 ? 1 : 32);
  g.add_u32("llama.vocab_size", static_cast<uint32_t>(c.vocab_size));
  g.add_u32("llama.context_length", static_cast<uint32_t>(c.max_position_embeddings));
  g.add_u32("llama.embedding_length", static_cast<uint32_t>(c.hidden_size));
  g.add_u32("llama.block_count", static_cast<uint32_t>(c.num_layers));
  g.add_u32("llama.feed_forward_length", static_cast<uint32_t>(c.intermediate_size));
  g.add_u32("llama.attention.head_count", static_cast<uint32_t>(c.num_attention_heads));
  g.add_u32("llama.attention.head_count_kv", static_cast<uint32_t>(c.num_key_value_heads));
  g.add_u32("llama.attention.key_length", static_cast<uint32_t>(c.resolved_head_dim()));
  g.add_u32("llama.attention.value_length", static_cast<uint32_t>(c.resolved_head_dim()));
  g.add_u32("llama.rope.dimension_count", static_cast<uint32_t>(c.resolved_head_dim()));
  g.add_f32("llama.rope.freq_base", static_cast<float>(c.rope_theta));
  g.add_f32("llama.attention.layer_norm_rms_epsilon", static_cast<float>(c.rms_norm_eps));
  g.add_u32("llama.expert_count", static_cast<uint32_t>(c.moe.num_experts));
  g.add_u32("llama.expert_used_count", static_cast<uint32_t>(c.moe.num_experts_per_tok));
  g.add_string("tokenizer.ggml.model", "llama");
  g.add_string_array("tokenizer.ggml.tokens", vocab.pieces);
  g.add_f32_array("tokenizer.ggml.scores", vocab.scores);
  g.add_i32_array("tokenizer.ggml.token_type", vocab.types);
  g.add_u32("tokenizer.ggml.bos_token_id", static_cast<uint32_t>(vocab.bos));
  g.add_u32("tokenizer.ggml.eos_token_id", static_cast<uint32_t>(vocab.eos));
  g.add_u32("tokenizer.ggml.unknown_token_id", static_cast<uint32_t>(vocab.unk));
  g.add_bool("tokenizer.ggml.add_bos_token", true);
  g.add_bool("tokenizer.ggml.add_eos_token", false);

  g.add_tensor("token_embd.weight", w("model.embed_tokens.weight"), t);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string hf = "model.layers." + std::to_string(l) + ".";
    const std::string gg = "blk." + std::to_string(l) + ".";
    g.add_tensor(gg + "attn_norm.weight", w(hf + "input_layernorm.weight"), GgmlType::F32);
    g.add_tensor(gg + "attn_q.weight", permute_rope_rows(w(hf + "self_attn.q_proj.weight"), c.num_attention_heads), t);
    g.add_tensor(gg + "attn_k.weight", permute_rope_rows(w(hf + "self_attn.k_proj.weight"), c.num_key_value_heads), t);
    g.add_tensor(gg + "attn_v.weight", w(hf + "self_attn.v_proj.weight"), t);
    g.add_tensor(gg + "attn_output.weight", w(hf + "self_attn.o_proj.weight"), t);
    g.add_tensor(gg + "ffn_norm.weight", w(hf + "post_attention_layernorm.weight"), GgmlType::F32);
    g.add_tensor(gg + "ffn_gate_inp.weight", w(hf + "block_sparse_moe.gate.weight"), GgmlType::F32);
    std::vector<at::Tensor> w1, w2, w3;
    for (int64_t e = 0; e < c.moe.num_experts; ++e) {
      const std::string ex = hf + "block_sparse_moe.experts." + std::to_string(e) + ".";
      w1.push_back(w(ex + "w1.weight"));
      w2.push_back(w(ex + "w2.weight"));
      w3.push_back(w(ex + "w3.weight"));
    }
    g.add_tensor(gg + "ffn_gate_exps.weight", at::stack(w1), t);  // [E, I, H]
    g.add_tensor(gg + "ffn_down_exps.weight", at::stack(w2), t);  // [E, H, I]
    g.add_tensor(gg + "ffn_up_exps.weight", at::stack(w3), t);    // [E, I, H]
  }
  g.add_tensor("output_norm.weight", w("model.norm.weight"), GgmlType::F32);
  if (!c.tie_word_embeddings) g.add_tensor("output.weight", w("lm_head.weight"), t);
  const std::string tmp = path + ".tmp-" + std::to_string(::getpid());
  try {
    g.write(tmp);
  } catch (...) {
    fs::remove(tmp);
    throw;
  }
  fs::rename(tmp, path);
}

}  // namespace moeforge::io
