// What a parameter is, from its Hugging Face name (the names are MixtralForCausalLM's, one to one).
#pragma once
#include <string>

namespace moeforge {

// A parameter of an MoE layer's expert bank: sharded under expert parallelism, counted once per
// expert-parallel group when clipping, owned per replica under ZeRO-1.
inline bool is_expert_param(const std::string& name) {
  return name.find(".block_sparse_moe.experts.") != std::string::npos;
}

}  // namespace moeforge
