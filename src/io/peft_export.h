// A LoRA adapter in Hugging Face PEFT's format, which `PeftModel.from_pretrained(base, DIR)` loads onto the
// base's Hugging Face export: adapter_config.json (peft_type LORA) and adapter_model.safetensors with
// PEFT's key names ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", per expert for
// transformers' per-expert Mixtral layout: "...block_sparse_moe.experts.3.w1.lora_B.weight").
#pragma once
#include <ATen/core/Tensor.h>

#include <map>
#include <string>
#include <utility>
#include <vector>

namespace moeforge::io {

struct PeftAdapterConfig {
  int64_t r = 8;
  double lora_alpha = 8;
  double lora_dropout = 0;
  std::vector<std::string> target_modules;
  std::map<std::string, int64_t> rank_pattern;  // module name -> its own rank (the experts' expert_rank)
  bool use_rslora = false;
  std::string base_model_name_or_path;
};

// `adapters` are named without PEFT's "base_model.model." prefix (moeforge's adapter names); written in
// `dtype` (bf16 | fp16 | fp32) into a temp directory renamed to `out_dir` (an existing non-empty one is an error).
void export_peft(const PeftAdapterConfig& c, const std::vector<std::pair<std::string, at::Tensor>>& adapters,
                 const std::string& out_dir, const std::string& dtype);

}  // namespace moeforge::io
