#include "io/model_config_yaml.h"

#include "io/yaml_reader.h"

namespace moeforge::io {

const KeyTable<ModelConfig>& model_config_keys() {
  static const KeyTable<ModelConfig> t = [] {
    KeyTable<ModelConfig> k;
    k.string("name", [](auto& c) -> auto& { return c.name; }, nullptr, "a label for logs and exports")
        .integer("vocab_size", [](auto& c) -> auto& { return c.vocab_size; }, positive(), "tokens in the vocabulary")
        .integer("hidden_size", [](auto& c) -> auto& { return c.hidden_size; }, positive(), "model width H")
        .integer("intermediate_size", [](auto& c) -> auto& { return c.intermediate_size; }, positive(),
                 "each expert's SwiGLU width")
        .integer("num_layers", [](auto& c) -> auto& { return c.num_layers; }, positive(), "decoder layers")
        .integer("num_attention_heads", [](auto& c) -> auto& { return c.num_attention_heads; }, positive(),
                 "query heads")
        .integer("num_key_value_heads", [](auto& c) -> auto& { return c.num_key_value_heads; }, positive(),
                 "key/value heads (GQA); divides num_attention_heads")
        .optional_integer("head_dim", [](auto& c) -> auto& { return c.head_dim; }, positive(),
                          "per-head width; null = hidden_size / num_attention_heads (must be even: RoPE)")
        .integer("max_position_embeddings", [](auto& c) -> auto& { return c.max_position_embeddings; }, positive(),
                 "longest sequence")
        .optional_integer("sliding_window", [](auto& c) -> auto& { return c.sliding_window; }, positive(),
                          "null = full causal attention; w = a token sees at most w positions, itself included")
        .number("rope_theta", [](auto& c) -> auto& { return c.rope_theta; }, positive(), "RoPE base")
        .number("rms_norm_eps", [](auto& c) -> auto& { return c.rms_norm_eps; }, positive(), "RMSNorm epsilon")
        .boolean("tie_word_embeddings", [](auto& c) -> auto& { return c.tie_word_embeddings; },
                 "LM head shares the embedding matrix")
        .number("init_std", [](auto& c) -> auto& { return c.init_std; }, positive(), "std of the normal init")
        .integer("moe.num_experts", [](auto& c) -> auto& { return c.moe.num_experts; }, positive(), "experts per layer E")
        .integer("moe.num_experts_per_tok", [](auto& c) -> auto& { return c.moe.num_experts_per_tok; }, positive(),
                 "top-k experts per token (<= num_experts)")
        .number("moe.aux_loss_coef", [](auto& c) -> auto& { return c.moe.aux_loss_coef; }, non_negative(),
                "load-balancing loss coefficient (HF router_aux_loss_coef)")
        .number("moe.z_loss_coef", [](auto& c) -> auto& { return c.moe.z_loss_coef; }, non_negative(),
                "router z-loss coefficient (ST-MoE), 0 = off")
        .number("moe.router_jitter", [](auto& c) -> auto& { return c.moe.router_jitter; }, in_range(0, 1, false),
                "multiplicative router input noise U(1-j, 1+j) while training")
        .enumeration("moe.balance", [](auto& c) -> auto& { return c.moe.balance; },
                     {"aux_loss", "aux_free_bias", "none"},
                     std::vector<Balance>{Balance::AuxLoss, Balance::AuxFreeBias, Balance::None},
                     "load balancing: the auxiliary loss, DeepSeek-V3's selection bias, or none")
        .number("moe.bias_update_rate", [](auto& c) -> auto& { return c.moe.bias_update_rate; }, non_negative(),
                "step of the aux-loss-free bias update")
        .enumeration("moe.bias_update", [](auto& c) -> auto& { return c.moe.bias_update; }, {"sign", "proportional"},
                     std::vector<BiasUpdate>{BiasUpdate::Sign, BiasUpdate::Proportional},
                     "aux-loss-free bias step: rate * sign(mean - load), or rate * (mean - load) / mean")
        .number("moe.seq_aux_loss_coef", [](auto& c) -> auto& { return c.moe.seq_aux_loss_coef; }, non_negative(),
                "sequence-wise balancing loss coefficient (the balancing loss within each sequence, averaged), 0 = off")
        .enumeration("moe.balance_scope", [](auto& c) -> auto& { return c.moe.balance_scope; },
                     {"micro_batch", "global_batch"},
                     std::vector<BalanceScope>{BalanceScope::MicroBatch, BalanceScope::GlobalBatch},
                     "tokens the aux loss counts its expert fractions over: each micro-batch, or the whole step "
                     "(every micro-batch of every rank)")
        .integer("moe.num_shared_experts", [](auto& c) -> auto& { return c.moe.num_shared_experts; }, non_negative(),
                 "experts of intermediate_size every token passes through beside its routed ones (DeepSeekMoE, "
                 "Qwen-MoE), 0 = none; exported as Qwen2MoeForCausalLM")
        .boolean("moe.shared_expert_gate", [](auto& c) -> auto& { return c.moe.shared_expert_gate; },
                 "scale the shared experts' output by sigmoid(g . x) per token (Qwen-MoE); false: add it as is");
    return k;
  }();
  return t;
}

ModelConfig parse_model_config(const YAML::Node& node, const std::string& file, const std::string& prefix) {
  ModelConfig c;
  YamlMap m(node, file, prefix);
  model_config_keys().parse(m, c);
  // Cross-key constraints, each reported at the key that has to change.
  if (auto p = model_config_problem(c)) {
    const auto dot = p->key.find('.');
    if (dot == std::string::npos) m.fail(p->key, p->what);
    YamlMap section(node[p->key.substr(0, dot)], file, prefix + p->key.substr(0, dot + 1));
    section.fail(p->key.substr(dot + 1), p->what);
  }
  return c;
}

ModelConfig load_model_config(const std::string& path, const std::vector<std::string>& overrides) {
  YAML::Node root = load_yaml_file(path);
  for (const auto& o : overrides) apply_override(root, o);
  return parse_model_config(root, path);
}

std::string model_config_to_yaml(const ModelConfig& c) { return model_config_keys().emit(c); }

void validate_model_config(const ModelConfig& c, const std::string& file) {
  if (auto p = model_config_keys().first_problem(c)) throw UserError(file + ": key '" + p->first + "': " + p->second);
  if (auto p = model_config_problem(c)) throw UserError(file + ": key '" + p->key + "': " + p->what);
}

}  // namespace moeforge::io
