#include "model/config.h"

namespace moeforge {

const char* balance_name(Balance b) {
  switch (b) {
    case Balance::AuxLoss: return "aux_loss";
    case Balance::AuxFreeBias: return "aux_free_bias";
    case Balance::None: return "none";
  }
  return "?";
}

std::optional<ConfigProblem> model_config_problem(const ModelConfig& c) {
  if (c.moe.num_experts_per_tok > c.moe.num_experts)
    return ConfigProblem{"moe.num_experts_per_tok", "top-k " + std::to_string(c.moe.num_experts_per_tok) +
                                                        " exceeds moe.num_experts (" +
                                                        std::to_string(c.moe.num_experts) + ")"};
  if (c.num_key_value_heads > 0 && c.num_attention_heads % c.num_key_value_heads != 0)
    return ConfigProblem{"num_key_value_heads", "num_attention_heads (" + std::to_string(c.num_attention_heads) +
                                                    ") is not divisible by num_key_value_heads (" +
                                                    std::to_string(c.num_key_value_heads) + ")"};
  if (!c.head_dim && c.num_attention_heads > 0 && c.hidden_size % c.num_attention_heads != 0)
    return ConfigProblem{"num_attention_heads", "hidden_size (" + std::to_string(c.hidden_size) +
                                                    ") is not divisible by num_attention_heads (" +
                                                    std::to_string(c.num_attention_heads) + "); set head_dim explicitly"};
  if (c.moe.num_shared_experts > 0 && c.dense())
    return ConfigProblem{"moe.num_shared_experts", "a dense config (moe.num_experts: 1) has no shared experts; widen "
                                                   "intermediate_size instead"};
  if (c.num_attention_heads > 0 && c.resolved_head_dim() % 2 != 0)
    return ConfigProblem{c.head_dim ? "head_dim" : "num_attention_heads",
                         "head dimension " + std::to_string(c.resolved_head_dim()) + " must be even for RoPE"};
  return std::nullopt;
}

}  // namespace moeforge
