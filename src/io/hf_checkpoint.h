// Hugging Face checkpoint directories (MixtralForCausalLM): export and import.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <functional>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "model/config.h"

namespace moeforge::io {

struct HfExportOptions {
  std::string out_dir;
  std::string dtype = "bf16";            // bf16 | fp16 | fp32
  uint64_t max_shard_bytes = 5000000000;  // "5GB" (decimal, as transformers counts)
  std::string tokenizer_path;            // copied as tokenizer.model when set
};

// A dense config's Hugging Face (MistralForCausalLM) name for our parameter `ours`: expert 0's w1 / w3 / w2 are
// mlp.gate_proj / up_proj / down_proj, the router (block_sparse_moe.gate) has none (""); other names are the same.
std::string dense_hf_name(const std::string& ours);

// A config with shared experts (moe.num_shared_experts > 0) is Qwen2MoeForCausalLM's: our parameter `ours` under
// its name (block_sparse_moe.* -> mlp.*, w1 / w3 / w2 -> gate_proj / up_proj / down_proj, shared_expert and
// shared_expert_gate kept); other names are the same.
std::string qwen2_moe_hf_name(const std::string& ours);

// The Hugging Face architecture a config exports as: MixtralForCausalLM, MistralForCausalLM (dense) or
// Qwen2MoeForCausalLM (shared experts); a UserError saying why when none holds it (e.g. shared experts without
// their gate, which Qwen2-MoE always has).
std::string hf_architecture(const ModelConfig& c);

// Parses "5GB", "500MB", "100KB", "123" (bytes); UserError otherwise.
uint64_t parse_size(const std::string& s, const std::string& what);

// Writes config.json, generation_config.json, the weights (per-expert layout, sharded with
// model.safetensors.index.json when above the shard size), tokenizer.model, tokenizer_config.json
// (with the Mistral chat template) and special_tokens_map.json. `weights` are our parameters (named as
// MixtralForCausalLM's; a dense config's are written under MistralForCausalLM's names, see dense_hf_name, and one
// with shared experts under Qwen2MoeForCausalLM's, with zero q/k/v biases, see qwen2_moe_hf_name).
// Written into a temp directory and renamed into place; an existing out_dir is an error.
void export_hf(const ModelConfig& c, const std::vector<std::pair<std::string, at::Tensor>>& weights,
               const HfExportOptions& opt);
// The same, streamed: the weights are fetched one by one as their shard is written, so that one shard
// (--max-shard-size) is the most that is held at once, whatever the model's size.
struct WeightStream {
  std::vector<std::pair<std::string, std::vector<int64_t>>> shapes;  // HF names and shapes, in writing order
  std::function<at::Tensor(const std::string& name)> get;             // any dtype; converted on the way out
};
void export_hf(const ModelConfig& c, const WeightStream& weights, const HfExportOptions& opt);

// The Jinja chat template written into tokenizer_config.json (Mixtral-Instruct's format).
const char* mistral_chat_template();

// Reads a Hugging Face Mixtral directory: config.json, single-file or sharded safetensors, the
// per-expert layout or transformers v5's fused one (mlp.experts.gate_up_proj [E, 2I, H] with the w1
// rows first, mlp.experts.down_proj [E, H, I]), any float dtype; or a dense Mistral / Llama one (layout
// "dense": its MLP is expert 0, its router, which a single expert does not use, reads as zeros). Tensors are
// served under our (per-expert, HF v4) names, converted to fp32.
class HfCheckpoint {
 public:
  explicit HfCheckpoint(const std::string& dir);
  const ModelConfig& config() const { return config_; }
  const std::string& layout() const { return layout_; }  // "per-expert" | "fused" | "dense"
  bool has(const std::string& name) const;
  at::Tensor get(const std::string& name) const;  // UserError naming the directory when missing
  // Tensors in the files that no parameter of `expected` explains (e.g. a different architecture).
  std::vector<std::string> unexplained(const std::vector<std::string>& expected) const;
  std::string tokenizer_path() const;  // dir/tokenizer.model or ""

 private:
  const SafetensorsFile* file_of(const std::string& stored_name) const;
  at::Tensor stored(const std::string& stored_name) const;
  // Expert e's row of a fused [E, ...] tensor (only its bytes are read), with the fused shape checked.
  at::Tensor stored_expert(const std::string& stored_name, int64_t e, int64_t rows, int64_t cols) const;
  std::string dir_;
  ModelConfig config_;
  std::string layout_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, size_t> where_;  // stored tensor name -> file index
};

}  // namespace moeforge::io
