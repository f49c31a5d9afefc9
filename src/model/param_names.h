// What a parameter is, from its Hugging Face name (the names are MixtralForCausalLM's, one to one).
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace moeforge {

// A parameter of an MoE layer's expert bank: sharded under expert parallelism, counted once per
// expert-parallel group when clipping, owned per replica under ZeRO-1.
inline bool is_expert_param(const std::string& name) {
  return name.find(".block_sparse_moe.experts.") != std::string::npos;
}

// An expert parameter's name in parts: "model.layers.3.block_sparse_moe.experts.5.w1.weight" is
// {"model.layers.3", 5, "w1.weight"}; nullopt for a parameter that is not an expert's.
struct ExpertParamName {
  std::string layer;  // the layer's prefix, "model.layers.3"
  int64_t expert = 0;
  std::string rest;   // after the expert id, "w1.weight"
};
inline std::optional<ExpertParamName> parse_expert_param(const std::string& name) {
  static const std::string key = ".block_sparse_moe.experts.";
  const auto p = name.find(key);
  if (p == std::string::npos) return std::nullopt;
  const auto id = p + key.size(), dot = name.find('.', id);
  if (dot == std::string::npos || dot == id || name.find_first_not_of("0123456789", id) != dot) return std::nullopt;
  return ExpertParamName{name.substr(0, p), std::stoll(name.substr(id, dot - id)), name.substr(dot + 1)};
}
inline std::string expert_param_name(const std::string& layer, int64_t expert, const std::string& rest) {
  return layer + ".block_sparse_moe.experts." + std::to_string(expert) + "." + rest;
}

// The expert parameters of a model with `num_layers` layers of `num_experts` experts that lie outside
// [first, first + count): the other ranks' share, for checks that every tensor of a source has its place.
inline std::vector<std::string> expert_names_outside(int64_t num_layers, int64_t num_experts, int64_t first,
                                                     int64_t count) {
  std::vector<std::string> out;
  for (int64_t i = 0; i < num_layers; ++i)
    for (int64_t e = 0; e < num_experts; ++e)
      if (e < first || e >= first + count)
        for (const char* w : {"w1", "w2", "w3"})
          out.push_back(expert_param_name("model.layers." + std::to_string(i), e, std::string(w) + ".weight"));
  return out;
}

}  // namespace moeforge
