// What a parameter is, from its Hugging Face name (the names are MixtralForCausalLM's, one to one).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace moeforge {

// A parameter of an MoE layer's expert bank: sharded under expert parallelism, counted once per
// expert-parallel group when clipping, owned per replica under ZeRO-1.
inline bool is_expert_param(const std::string& name) {
  return name.find(".block_sparse_moe.experts.") != std::string::npos;
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
          out.push_back("model.layers." + std::to_string(i) + ".block_sparse_moe.experts." + std::to_string(e) + "." + w +
                        ".weight");
  return out;
}

}  // namespace moeforge
