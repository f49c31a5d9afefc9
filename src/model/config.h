// The model configuration: a Mixtral-style sparse MoE decoder. Every default is here.
// No LibTorch in this header: `moeforge info` and the config checks need none.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace YAML {
class Node;
}

namespace moeforge {

enum class Balance { AuxLoss, AuxFreeBias, None };
const char* balance_name(Balance b);

struct MoEConfig {
  int64_t num_experts = 8;
  int64_t num_experts_per_tok = 2;
  double aux_loss_coef = 0.02;      // load-balancing loss coefficient (HF router_aux_loss_coef)
  double z_loss_coef = 0.0;         // router z-loss (ST-MoE), 0 = off
  double router_jitter = 0.0;       // multiplicative input noise U(1-j, 1+j) while training
  Balance balance = Balance::AuxLoss;
  double bias_update_rate = 1e-3;   // aux-loss-free bias step (DeepSeek-V3 gamma)
};

struct ModelConfig {
  std::string name = "unnamed";
  int64_t vocab_size = 32000;
  int64_t hidden_size = 4096;
  int64_t intermediate_size = 14336;
  int64_t num_layers = 32;
  int64_t num_attention_heads = 32;
  int64_t num_key_value_heads = 8;
  std::optional<int64_t> head_dim;  // default hidden_size / num_attention_heads
  int64_t max_position_embeddings = 32768;
  std::optional<int64_t> sliding_window;  // nullopt = full causal attention
  double rope_theta = 1e6;
  double rms_norm_eps = 1e-5;
  bool tie_word_embeddings = false;
  double init_std = 0.02;
  MoEConfig moe;

  int64_t resolved_head_dim() const { return head_dim ? *head_dim : hidden_size / num_attention_heads; }
  int64_t q_dim() const { return num_attention_heads * resolved_head_dim(); }
  int64_t kv_dim() const { return num_key_value_heads * resolved_head_dim(); }
};

// Reads and checks a model config from a YAML mapping; errors name `file` and the key.
// `prefix` is the dotted path of the mapping in its document ("model." inside a recipe).
ModelConfig parse_model_config(const YAML::Node& node, const std::string& file, const std::string& prefix = "");

// Loads a model config file, applying `--set key=value` overrides first.
ModelConfig load_model_config(const std::string& path, const std::vector<std::string>& overrides = {});

// Checks cross-key constraints; throws UserError naming `file` and the key.
void validate_model_config(const ModelConfig& c, const std::string& file);

// The config as YAML text (every key, defaults included), as a run directory records it.
std::string model_config_to_yaml(const ModelConfig& c);

}  // namespace moeforge
