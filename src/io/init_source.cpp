#include "io/init_source.h"

#include <filesystem>

#include "core/error.h"
#include "io/hf_config.h"
#include "io/model_config_yaml.h"
#include "io/yaml_reader.h"

namespace fs = std::filesystem;

namespace moeforge::io {

ModelConfig read_checkpoint_config(const std::string& ckpt_dir) {
  if (!fs::is_directory(ckpt_dir)) throw UserError(ckpt_dir + ": not a checkpoint directory");
  const std::string path = ckpt_dir + "/config.yaml";
  if (!fs::exists(path)) throw UserError(ckpt_dir + ": no config.yaml; not a moeforge checkpoint");
  return parse_model_config(load_yaml_file(path), path);
}

ModelConfig read_init_config(const std::string& init_from) {
  const auto src = io::parse_init_source(init_from);
  return src.hf ? read_hf_config_file(src.dir + "/config.json") : read_checkpoint_config(src.dir);
}

}  // namespace moeforge::io
