// Where a run's weights start from: `init_from: hf:DIR` (a Hugging Face directory) or a moeforge
// checkpoint directory. The one parser of the `hf:` prefix.
#pragma once
#include <string>

namespace moeforge::io {

struct InitSource {
  bool hf = false;   // a Hugging Face MixtralForCausalLM directory
  std::string dir;   // the directory, without the prefix
};

inline InitSource parse_init_source(const std::string& init_from) {
  if (init_from.rfind("hf:", 0) == 0) return {true, init_from.substr(3)};
  return {false, init_from};
}

}  // namespace moeforge::io
