// Writing a checkpoint of a model too large to hold at once: one expert share at a time. Share k of N is
// built (the dense part and experts [k E/N, (k+1) E/N) of every layer), filled by the caller (initialised from
// a seed, read from a Hugging Face directory) and written as the expert-parallel checkpoint layout's
// experts-KK-of-NN.safetensors; share 0 last, with the dense part, completes the directory (layout.json,
// manifest, rename). The result loads into any layout. Peak: the dense part plus one share of the experts.
#pragma once
#include <functional>
#include <string>

#include "model/config.h"
#include "model/decoder.h"

namespace moeforge::train {

// Shares of at most ~1 GB of fp32 experts each, a divisor of num_experts (1 for a small model).
int default_expert_shares(const ModelConfig& cfg);

// `fill(model, k)` puts share k's values into `model` (built with share k's experts). `shares` must divide
// num_experts (UserError naming `what`, e.g. "init: --shards").
void write_checkpoint_by_shares(const ModelConfig& cfg, const std::string& out_dir, int shares,
                                const std::function<void(MixtralForCausalLM&, int)>& fill,
                                const std::string& tokenizer_path, const std::string& what);

}  // namespace moeforge::train
