#include "model/config.h"

#include <yaml-cpp/yaml.h>

#include "core/error.h"
#include "io/yaml_reader.h"

namespace moeforge {

const char* balance_name(Balance b) {
  switch (b) {
    case Balance::AuxLoss: return "aux_loss";
    case Balance::AuxFreeBias: return "aux_free_bias";
    case Balance::None: return "none";
  }
  return "?";
}

namespace {

void require_positive(io::YamlMap& m, const std::string& key, int64_t v) {
  if (v <= 0) m.fail(key, "must be positive, got " + std::to_string(v));
}
void require_positive(io::YamlMap& m, const std::string& key, double v) {
  if (!(v > 0)) m.fail(key, "must be positive, got " + std::to_string(v));
}
void require_non_negative(io::YamlMap& m, const std::string& key, double v) {
  if (v < 0) m.fail(key, "must be >= 0, got " + std::to_string(v));
}

}  // namespace

ModelConfig parse_model_config(const YAML::Node& node, const std::string& file, const std::string& prefix) {
  ModelConfig c;
  io::YamlMap m(node, file, prefix);
  c.name = m.get_string("name", c.name);
  c.vocab_size = m.get_int("vocab_size", c.vocab_size);
  require_positive(m, "vocab_size", c.vocab_size);
  c.hidden_size = m.get_int("hidden_size", c.hidden_size);
  require_positive(m, "hidden_size", c.hidden_size);
  c.intermediate_size = m.get_int("intermediate_size", c.intermediate_size);
  require_positive(m, "intermediate_size", c.intermediate_size);
  c.num_layers = m.get_int("num_layers", c.num_layers);
  require_positive(m, "num_layers", c.num_layers);
  c.num_attention_heads = m.get_int("num_attention_heads", c.num_attention_heads);
  require_positive(m, "num_attention_heads", c.num_attention_heads);
  c.num_key_value_heads = m.get_int("num_key_value_heads", c.num_key_value_heads);
  require_positive(m, "num_key_value_heads", c.num_key_value_heads);
  c.head_dim = m.get_optional_int("head_dim", std::nullopt);
  if (c.head_dim) require_positive(m, "head_dim", *c.head_dim);
  c.max_position_embeddings = m.get_int("max_position_embeddings", c.max_position_embeddings);
  require_positive(m, "max_position_embeddings", c.max_position_embeddings);
  c.sliding_window = m.get_optional_int("sliding_window", std::nullopt);
  if (c.sliding_window) require_positive(m, "sliding_window", *c.sliding_window);
  c.rope_theta = m.get_double("rope_theta", c.rope_theta);
  require_positive(m, "rope_theta", c.rope_theta);
  c.rms_norm_eps = m.get_double("rms_norm_eps", c.rms_norm_eps);
  require_positive(m, "rms_norm_eps", c.rms_norm_eps);
  c.tie_word_embeddings = m.get_bool("tie_word_embeddings", c.tie_word_embeddings);
  c.init_std = m.get_double("init_std", c.init_std);
  require_positive(m, "init_std", c.init_std);

  io::YamlMap moe = m.get_map("moe");
  c.moe.num_experts = moe.get_int("num_experts", c.moe.num_experts);
  require_positive(moe, "num_experts", c.moe.num_experts);
  c.moe.num_experts_per_tok = moe.get_int("num_experts_per_tok", c.moe.num_experts_per_tok);
  require_positive(moe, "num_experts_per_tok", c.moe.num_experts_per_tok);
  c.moe.aux_loss_coef = moe.get_double("aux_loss_coef", c.moe.aux_loss_coef);
  require_non_negative(moe, "aux_loss_coef", c.moe.aux_loss_coef);
  c.moe.z_loss_coef = moe.get_double("z_loss_coef", c.moe.z_loss_coef);
  require_non_negative(moe, "z_loss_coef", c.moe.z_loss_coef);
  c.moe.router_jitter = moe.get_double("router_jitter", c.moe.router_jitter);
  if (c.moe.router_jitter < 0 || c.moe.router_jitter >= 1)
    moe.fail("router_jitter", "must be in [0, 1), got " + std::to_string(c.moe.router_jitter));
  std::string bal = moe.get_enum("balance", {"aux_loss", "aux_free_bias", "none"}, "aux_loss");
  c.moe.balance = bal == "aux_loss" ? Balance::AuxLoss : bal == "aux_free_bias" ? Balance::AuxFreeBias : Balance::None;
  c.moe.bias_update_rate = moe.get_double("bias_update_rate", c.moe.bias_update_rate);
  require_non_negative(moe, "bias_update_rate", c.moe.bias_update_rate);
  moe.finish();

  // Cross-key constraints, each reported at the key that has to change.
  if (c.moe.num_experts_per_tok > c.moe.num_experts)
    moe.fail("num_experts_per_tok", "top-k " + std::to_string(c.moe.num_experts_per_tok) +
                                        " exceeds moe.num_experts (" + std::to_string(c.moe.num_experts) + ")");
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    m.fail("num_key_value_heads", "num_attention_heads (" + std::to_string(c.num_attention_heads) +
                                      ") is not divisible by num_key_value_heads (" +
                                      std::to_string(c.num_key_value_heads) + ")");
  if (!c.head_dim && c.hidden_size % c.num_attention_heads != 0)
    m.fail("num_attention_heads", "hidden_size (" + std::to_string(c.hidden_size) +
                                      ") is not divisible by num_attention_heads (" +
                                      std::to_string(c.num_attention_heads) + "); set head_dim explicitly");
  if (c.resolved_head_dim() % 2 != 0)
    m.fail(c.head_dim ? "head_dim" : "num_attention_heads",
           "head dimension " + std::to_string(c.resolved_head_dim()) + " must be even for RoPE");
  m.finish();
  return c;
}

ModelConfig load_model_config(const std::string& path, const std::vector<std::string>& overrides) {
  YAML::Node root = io::load_yaml_file(path);
  for (const auto& o : overrides) io::apply_override(root, o);
  return parse_model_config(root, path);
}

void validate_model_config(const ModelConfig& c, const std::string& file) {
  // Re-run the checks through the YAML path so that every message has one shape.
  YAML::Node n = YAML::Load(model_config_to_yaml(c));
  parse_model_config(n, file);
}

std::string model_config_to_yaml(const ModelConfig& c) {
  YAML::Emitter e;
  e << YAML::BeginMap;
  e << YAML::Key << "name" << YAML::Value << c.name;
  e << YAML::Key << "vocab_size" << YAML::Value << c.vocab_size;
  e << YAML::Key << "hidden_size" << YAML::Value << c.hidden_size;
  e << YAML::Key << "intermediate_size" << YAML::Value << c.intermediate_size;
  e << YAML::Key << "num_layers" << YAML::Value << c.num_layers;
  e << YAML::Key << "num_attention_heads" << YAML::Value << c.num_attention_heads;
  e << YAML::Key << "num_key_value_heads" << YAML::Value << c.num_key_value_heads;
  e << YAML::Key << "head_dim" << YAML::Value;
  if (c.head_dim) e << *c.head_dim; else e << YAML::Null;
  e << YAML::Key << "max_position_embeddings" << YAML::Value << c.max_position_embeddings;
  e << YAML::Key << "sliding_window" << YAML::Value;
  if (c.sliding_window) e << *c.sliding_window; else e << YAML::Null;
  e << YAML::Key << "rope_theta" << YAML::Value << c.rope_theta;
  e << YAML::Key << "rms_norm_eps" << YAML::Value << c.rms_norm_eps;
  e << YAML::Key << "tie_word_embeddings" << YAML::Value << c.tie_word_embeddings;
  e << YAML::Key << "init_std" << YAML::Value << c.init_std;
  e << YAML::Key << "moe" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "num_experts" << YAML::Value << c.moe.num_experts;
  e << YAML::Key << "num_experts_per_tok" << YAML::Value << c.moe.num_experts_per_tok;
  e << YAML::Key << "aux_loss_coef" << YAML::Value << c.moe.aux_loss_coef;
  e << YAML::Key << "z_loss_coef" << YAML::Value << c.moe.z_loss_coef;
  e << YAML::Key << "router_jitter" << YAML::Value << c.moe.router_jitter;
  e << YAML::Key << "balance" << YAML::Value << balance_name(c.moe.balance);
  e << YAML::Key << "bias_update_rate" << YAML::Value << c.moe.bias_update_rate;
  e << YAML::EndMap << YAML::EndMap;
  return std::string(e.c_str()) + "\n";
}

}  // namespace moeforge
