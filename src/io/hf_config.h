// Our model config <-> Hugging Face MixtralConfig (config.json).
#pragma once
#include <nlohmann/json.hpp>
#include <string>

#include "model/config.h"

namespace moeforge::io {

// config.json for MixtralForCausalLM (MistralForCausalLM for a dense config, Qwen2MoeForCausalLM for one with
// shared experts: io::hf_architecture checks it can); `torch_dtype` is "float32" | "bfloat16" | "float16".
nlohmann::json to_hf_config(const ModelConfig& c, const std::string& torch_dtype);

// Reads config.json (path for messages). Unknown keys are ignored (HF configs carry many);
// missing or ill-typed required keys, a model_type other than mixtral, mistral or llama (the two dense ones read
// as one expert, top-1), RoPE scaling, biases or an activation other than SiLU are UserErrors naming the file and key.
ModelConfig from_hf_config(const nlohmann::json& j, const std::string& path);
ModelConfig read_hf_config_file(const std::string& path);

}  // namespace moeforge::io
