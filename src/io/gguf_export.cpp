#include "io/gguf_export.h"

#include <ATen/ATen.h>
#include <unistd.h>

#include <filesystem>

#include "core/error.h"
#include "model/param_count.h"

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

namespace {

// Writes the file through a temp name renamed into place once every tensor is complete.
void write_into_place(const GgufWriter& g, const std::string& path, const std::function<void(GgufSink&)>& fill) {
  const std::string tmp = path + ".tmp-" + std::to_string(::getpid());
  {
    GgufSink sink = g.start(tmp, 32, path);  // removes the temp file unless closed
    fill(sink);
    sink.close();
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) {
    fs::remove(tmp);
    throw UserError(path + ": cannot move the export into place: " + ec.message());
  }
}

// The model's parameter shapes by Hugging Face name; a name the config does not have is an internal error.
class ShapeTable {
 public:
  explicit ShapeTable(const ModelConfig& c) {
    for (const auto& [n, s] : parameter_shapes(c)) shape_[n] = s;
  }
  const std::vector<int64_t>& operator()(const std::string& n) const {
    auto it = shape_.find(n);
    MF_CHECK(it != shape_.end(), "parameter " + n);
    return it->second;
  }

 private:
  std::map<std::string, std::vector<int64_t>> shape_;
};

// What every GGUF export refuses before it writes anything: an existing file, a model llama.cpp's llama
// architecture cannot hold.
void check_gguf_export(const ModelConfig& c, const std::string& path) {
  if (fs::exists(path)) throw UserError(path + ": already exists; choose a new --out file");
  if (c.moe.num_shared_experts > 0)
    throw UserError(path + ": GGUF export writes llama.cpp's llama architecture, which has no shared experts");
}

}  // namespace

std::map<std::string, GgufTarget> gguf_layout(
    const ModelConfig& c, const std::function<void(const std::string&, const std::vector<int64_t>&, bool)>& declare) {
  const ShapeTable shape_of(c);
  std::map<std::string, GgufTarget> target;
  auto put = [&](const std::string& gg, const std::string& hf, bool matrix, int64_t rope_heads = 0) {
    declare(gg, shape_of(hf), matrix);
    target[hf] = {gg, -1, rope_heads};
  };
  put("token_embd.weight", "model.embed_tokens.weight", true);
  const int64_t E = c.moe.num_experts;
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string hf = "model.layers." + std::to_string(l) + ".";
    const std::string gg = "blk." + std::to_string(l) + ".";
    put(gg + "attn_norm.weight", hf + "input_layernorm.weight", false);
    put(gg + "attn_q.weight", hf + "self_attn.q_proj.weight", true, c.num_attention_heads);
    put(gg + "attn_k.weight", hf + "self_attn.k_proj.weight", true, c.num_key_value_heads);
    put(gg + "attn_v.weight", hf + "self_attn.v_proj.weight", true);
    put(gg + "attn_output.weight", hf + "self_attn.o_proj.weight", true);
    put(gg + "ffn_norm.weight", hf + "post_attention_layernorm.weight", false);
    if (c.dense()) {  // the one expert is the layer's MLP: ffn_gate / ffn_down / ffn_up
      target[hf + "block_sparse_moe.gate.weight"].skip = true;
      put(gg + "ffn_gate.weight", hf + "block_sparse_moe.experts.0.w1.weight", true);
      put(gg + "ffn_down.weight", hf + "block_sparse_moe.experts.0.w2.weight", true);
      put(gg + "ffn_up.weight", hf + "block_sparse_moe.experts.0.w3.weight", true);
      continue;
    }
    put(gg + "ffn_gate_inp.weight", hf + "block_sparse_moe.gate.weight", false);
    // Experts stacked per layer: [E, I, H] (w1 as gate, w3 as up), [E, H, I] (w2 as down).
    static const std::pair<const char*, const char*> kStacked[] = {
        {"w1", "ffn_gate_exps"}, {"w2", "ffn_down_exps"}, {"w3", "ffn_up_exps"}};
    for (const auto& [w, name] : kStacked) {
      std::vector<int64_t> s{E};
      for (int64_t d : shape_of(hf + "block_sparse_moe.experts.0." + w + ".weight")) s.push_back(d);
      declare(gg + name + ".weight", s, true);
      for (int64_t e = 0; e < E; ++e)
        target[hf + "block_sparse_moe.experts." + std::to_string(e) + "." + w + ".weight"] = {gg + name + ".weight", e, 0};
    }
  }
  put("output_norm.weight", "model.norm.weight", false);
  if (!c.tie_word_embeddings) put("output.weight", "lm_head.weight", true);
  return target;
}

void export_gguf(const ModelConfig& c, const HfTensorFeed& feed, const GgufVocab& vocab, const std::string& path,
                 const std::string& dtype) {
  static const std::map<std::string, std::pair<GgmlType, uint32_t>> kTypes = {  // and llama.cpp's file type
      {"f32", {GgmlType::F32, 0}}, {"f16", {GgmlType::F16, 1}}, {"bf16", {GgmlType::BF16, 32}},
      {"q8_0", {GgmlType::Q8_0, 7}}, {"q4_0", {GgmlType::Q4_0, 2}}};
  const auto type_it = kTypes.find(dtype);
  if (type_it == kTypes.end())
    throw UserError("--dtype for gguf must be f32, f16, bf16, q8_0 or q4_0, got '" + dtype + "'");
  const GgmlType t = type_it->second.first;
  check_gguf_export(c, path);
  const ShapeTable shape_of(c);
  GgufWriter g;
  g.add_string("general.architecture", "llama");
  g.add_string("general.name", c.name);
  g.add_u32("general.file_type", type_it->second.second);
  if (ggml_is_block_type(t)) g.add_u32("general.quantization_version", 2);
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
  if (!c.dense()) {  // a dense config is a plain llama model
    g.add_u32("llama.expert_count", static_cast<uint32_t>(c.moe.num_experts));
    g.add_u32("llama.expert_used_count", static_cast<uint32_t>(c.moe.num_experts_per_tok));
  }
  g.add_string("tokenizer.ggml.model", "llama");
  g.add_string_array("tokenizer.ggml.tokens", vocab.pieces);
  g.add_f32_array("tokenizer.ggml.scores", vocab.scores);
  g.add_i32_array("tokenizer.ggml.token_type", vocab.types);
  g.add_u32("tokenizer.ggml.bos_token_id", static_cast<uint32_t>(vocab.bos));
  g.add_u32("tokenizer.ggml.eos_token_id", static_cast<uint32_t>(vocab.eos));
  g.add_u32("tokenizer.ggml.unknown_token_id", static_cast<uint32_t>(vocab.unk));
  g.add_bool("tokenizer.ggml.add_bos_token", true);
  g.add_bool("tokenizer.ggml.add_eos_token", false);

  // Quantized files keep matrices whose rows are not whole blocks of 32 in f16 (as llama.cpp's quantizer falls back).
  auto fitting = [&](GgmlType type, const std::vector<int64_t>& s) {
    return ggml_is_block_type(type) && s.back() % 32 != 0 ? GgmlType::F16 : type;
  };
  const std::map<std::string, GgufTarget> target = gguf_layout(c, [&](const std::string& gg, const std::vector<int64_t>& s,
                                                                       bool matrix) {
    g.declare_tensor(gg, s, matrix ? fitting(t, s) : GgmlType::F32);
  });
  write_into_place(g, path, [&](GgufSink& sink) {
    feed([&](const std::string& name, const at::Tensor& w) {
      auto it = target.find(name);
      MF_CHECK(it != target.end(), "GGUF export: no place for " + name);
      const GgufTarget& x = it->second;
      if (x.skip) return;
      MF_CHECK(w.sizes().vec() == shape_of(name), "GGUF export: " + name + " has its shape");
      if (x.expert >= 0) sink.put(x.name, x.expert, w.unsqueeze(0));
      else sink.put(x.name, 0, x.rope_heads ? permute_rope_rows(w, x.rope_heads) : w);
    });
  });
}

void export_gguf_lora(const ModelConfig& c, const std::vector<GgufLoraPair>& adapters, const std::string& path,
                      const std::string& dtype) {
  if (dtype != "f32" && dtype != "f16") throw UserError("--dtype for gguf-lora must be f32 or f16, got '" + dtype + "'");
  const GgmlType t = dtype == "f32" ? GgmlType::F32 : GgmlType::F16;
  check_gguf_export(c, path);
  std::map<std::string, std::vector<int64_t>> stacked;  // a layer's stacked expert tensor: its [E, rows, cols]
  const std::map<std::string, GgufTarget> target = gguf_layout(c, [&](const std::string& gg, const std::vector<int64_t>& s, bool) {
    if (s.size() == 3) stacked[gg] = s;
  });
  GgufWriter g;
  g.add_string("general.architecture", "llama");
  g.add_string("general.type", "adapter");
  g.add_string("general.name", c.name + "-lora");
  g.add_string("adapter.type", "lora");
  // adapter.lora.alpha 0: llama.cpp then scales by 1, and each B holds its module's scale (alpha / r, or
  // alpha / sqrt(r) with rslora, r the module's own rank), which one alpha per file could not say.
  g.add_f32("adapter.lora.alpha", 0.0f);
  struct Place {
    const GgufTarget* base;
    const GgufLoraPair* pair;
  };
  std::vector<Place> places;
  std::map<std::string, int64_t> declared_rank;
  for (const auto& p : adapters) {
    auto it = target.find(p.weight);
    MF_CHECK(it != target.end(), "GGUF adapter for " + p.weight);
    const GgufTarget& x = it->second;
    if (x.skip) continue;
    const int64_t r = p.a.size(0);
    if (x.expert >= 0) {
      const auto& s = stacked.at(x.name);  // [E, out, in]
      if (!declared_rank.count(x.name)) {
        g.declare_tensor(x.name + ".lora_a", {s[0], r, s[2]}, t);
        g.declare_tensor(x.name + ".lora_b", {s[0], s[1], r}, t);
        declared_rank[x.name] = r;
      }
      MF_CHECK(declared_rank[x.name] == r, "one rank for the experts of " + x.name);
    } else {
      g.declare_tensor(x.name + ".lora_a", p.a.sizes().vec(), t);
      g.declare_tensor(x.name + ".lora_b", p.b.sizes().vec(), t);
    }
    places.push_back({&x, &p});
  }
  write_into_place(g, path, [&](GgufSink& sink) {
    for (const auto& [x, p] : places) {
      const at::Tensor b = p->b.to(at::kFloat) * p->scale;
      if (x->expert >= 0) {
        sink.put(x->name + ".lora_a", x->expert, p->a.unsqueeze(0));
        sink.put(x->name + ".lora_b", x->expert, b.unsqueeze(0));
      } else {
        sink.put(x->name + ".lora_a", 0, p->a);
        // B's rows are the weight's output rows: permuted for RoPE as the base weight's are.
        sink.put(x->name + ".lora_b", 0, x->rope_heads ? permute_rope_rows(b, x->rope_heads) : b);
      }
    }
  });
}

void export_gguf(const ModelConfig& c, const std::map<std::string, at::Tensor>& weights, const GgufVocab& vocab,
                 const std::string& path, const std::string& dtype) {
  export_gguf(
      c,
      [&](const std::function<void(const std::string&, const at::Tensor&)>& put) {
        for (const auto& [n, s] : parameter_shapes(c)) {
          auto it = weights.find(n);
          MF_CHECK(it != weights.end(), "weight " + n);
          put(n, it->second);
        }
      },
      vocab, path, dtype);
}

}  // namespace moeforge::io
