// Weights of a Hugging Face MixtralForCausalLM directory into a model (`moeforge import`, `init_from: hf:DIR`).
#pragma once
#include <string>

#include "model/decoder.h"

namespace moeforge::io {

// Copies weights from a Hugging Face Mixtral directory (per-expert or fused layout) into `model`;
// shapes must match, and tensors the model does not explain are an error. Expert biases start at zero.
void load_hf_weights(const std::string& hf_dir, MixtralForCausalLM& model);

}  // namespace moeforge::io
