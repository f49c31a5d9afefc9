// The model configuration: a Mixtral-style sparse MoE decoder. Every default is here; the keys' names,
// checks and help are declared once in io/model_config_yaml.cpp. A plain struct: no LibTorch, no YAML.
#pragma once
#include <cstdint>
#include <optional>
#include <string>

namespace moeforge {

enum class Balance { AuxLoss, AuxFreeBias, None };
const char* balance_name(Balance b);
// The aux-loss-free bias step: rate * sign(mean - load) (DeepSeek-V3, torchtitan), or proportional to the
// relative error, rate * (mean - load) / mean.
enum class BiasUpdate { Sign, Proportional };
// Over which tokens the aux loss counts its top-k fractions f: each micro-batch alone (HF Mixtral, Switch), or
// the whole optimizer step, every micro-batch of every rank (Qwen's global-batch balance, Megatron global_aux_loss).
enum class BalanceScope { MicroBatch, GlobalBatch };

struct MoEConfig {
  int64_t num_experts = 8;
  int64_t num_experts_per_tok = 2;
  double aux_loss_coef = 0.02;      // load-balancing loss coefficient (HF router_aux_loss_coef)
  double z_loss_coef = 0.0;         // router z-loss (ST-MoE), 0 = off
  double router_jitter = 0.0;       // multiplicative input noise U(1-j, 1+j) while training
  Balance balance = Balance::AuxLoss;
  double bias_update_rate = 1e-3;   // aux-loss-free bias step (DeepSeek-V3 gamma)
  BiasUpdate bias_update = BiasUpdate::Sign;
  double seq_aux_loss_coef = 0.0;   // sequence-wise balancing loss (DeepSeek-V3's complementary loss), 0 = off
  BalanceScope balance_scope = BalanceScope::MicroBatch;
  // Shared experts (DeepSeekMoE, Qwen-MoE): S SwiGLU experts of intermediate_size that every token passes
  // through beside its routed ones; held as one MLP of S x intermediate_size (the same function), on every rank.
  int64_t num_shared_experts = 0;
  // Qwen-MoE's gate on the shared output: sigmoid(g . x) per token (g [1, H], trained); false: added as is.
  bool shared_expert_gate = true;
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
  // One expert, chosen for every token with weight 1: a dense (Mistral) model. Its FFN is expert 0; its
  // router ([1, H], one logit) has no effect and no place in a Mistral checkpoint.
  bool dense() const { return moe.num_experts == 1; }
  // The shared experts' MLP width (0: none).
  int64_t shared_intermediate_size() const { return moe.num_shared_experts * intermediate_size; }
};

// A constraint between keys that a config breaks, reported at the key that has to change.
struct ConfigProblem {
  std::string key;   // dotted ("moe.num_experts_per_tok")
  std::string what;
};
// The first cross-key problem of `c` (top-k above the expert count, heads not divisible by kv heads, hidden
// not divisible by heads without head_dim, an odd head dimension), or nullopt.
std::optional<ConfigProblem> model_config_problem(const ModelConfig& c);

}  // namespace moeforge
