// The model config in YAML: its keys declared once (io/key_table.h), read strictly, written back whole.
#pragma once
#include <string>
#include <vector>

#include "io/key_table.h"
#include "model/config.h"

namespace moeforge::io {

// Every key of a model config (name, type, check, help; defaults in model/config.h).
const KeyTable<ModelConfig>& model_config_keys();

// Reads and checks a model config from a YAML mapping; errors name `file`, the line and the key.
// `prefix` is the dotted path of the mapping in its document ("model." inside a recipe).
ModelConfig parse_model_config(const YAML::Node& node, const std::string& file, const std::string& prefix = "");

// Loads a model config file, applying `--set key=value` overrides first.
ModelConfig load_model_config(const std::string& path, const std::vector<std::string>& overrides = {});

// The config as YAML text (every key, defaults included), as a run directory records it.
std::string model_config_to_yaml(const ModelConfig& c);

// Checks cross-key constraints of a config that came from elsewhere (e.g. a Hugging Face config.json);
// throws UserError naming `file` and the key.
void validate_model_config(const ModelConfig& c, const std::string& file);

}  // namespace moeforge::io
