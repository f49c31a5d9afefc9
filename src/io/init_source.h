// Where a run's weights start from: `init_from: hf:DIR` (a Hugging Face directory) or a moeforge
// checkpoint directory. The one parser of the `hf:` prefix.
#pragma once
#include <string>

#include "model/config.h"

namespace moeforge::io {

struct InitSource {
  bool hf = false;   // a Hugging Face MixtralForCausalLM directory
  std::string dir;   // the directory, without the prefix
};

inline InitSource parse_init_source(const std::string& init_from) {
  if (init_from.rfind("hf:", 0) == 0) return {true, init_from.substr(3)};
  return {false, init_from};
}

// The model config of a moeforge checkpoint directory (its config.yaml); UserError naming the directory otherwise.
ModelConfig read_checkpoint_config(const std::string& ckpt_dir);
// The model config of an init source: "hf:DIR" (its config.json) or a moeforge checkpoint directory.
ModelConfig read_init_config(const std::string& init_from);

}  // namespace moeforge::io
