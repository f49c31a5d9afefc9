#include "io/hf_config.h"

#include <fstream>

#include "io/model_config_yaml.h"
#include "core/error.h"

namespace moeforge::io {

namespace {
// The keys every architecture we write shares at the end of its config.json.
void add_common_keys(nlohmann::json& j, const ModelConfig& c, const std::string& torch_dtype) {
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["attention_dropout"] = 0.0;
  j["use_cache"] = true;
  j["bos_token_id"] = 1;
  j["eos_token_id"] = 2;
  j["torch_dtype"] = torch_dtype;
}

// Qwen2MoeForCausalLM: every layer sparse, the top-k weights renormalised (as Mixtral's), one shared expert of
// num_shared_experts x intermediate_size (S SwiGLU experts beside each other are one of S times the width).
nlohmann::json to_qwen2_moe_config(const ModelConfig& c, const std::string& torch_dtype) {
  const int64_t shared = c.moe.num_shared_experts * c.intermediate_size;
  nlohmann::json j;
  j["architectures"] = {"Qwen2MoeForCausalLM"};
  j["model_type"] = "qwen2_moe";
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = shared;  // the MLP of non-sparse layers (there are none)
  j["moe_intermediate_size"] = c.intermediate_size;
  j["shared_expert_intermediate_size"] = shared;
  j["num_experts"] = c.moe.num_experts;
  j["num_experts_per_tok"] = c.moe.num_experts_per_tok;
  j["norm_topk_prob"] = true;
  j["decoder_sparse_step"] = 1;
  j["mlp_only_layers"] = nlohmann::json::array();
  j["num_hidden_layers"] = c.num_layers;
  j["num_attention_heads"] = c.num_attention_heads;
  j["num_key_value_heads"] = c.num_key_value_heads;
  j["hidden_act"] = "silu";
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["use_sliding_window"] = false;
  j["sliding_window"] = nullptr;
  j["max_window_layers"] = c.num_layers;
  j["rope_theta"] = c.rope_theta;
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["initializer_range"] = c.init_std;
  j["router_aux_loss_coef"] = c.moe.aux_loss_coef;
  j["output_router_logits"] = false;
  add_common_keys(j, c, torch_dtype);
  return j;
}
}  // namespace

nlohmann::json to_hf_config(const ModelConfig& c, const std::string& torch_dtype) {
  if (c.moe.num_shared_experts > 0) return to_qwen2_moe_config(c, torch_dtype);
  nlohmann::json j;
  j["architectures"] = {c.dense() ? "MistralForCausalLM" : "MixtralForCausalLM"};
  j["model_type"] = c.dense() ? "mistral" : "mixtral";
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["num_hidden_layers"] = c.num_layers;
  j["num_attention_heads"] = c.num_attention_heads;
  j["num_key_value_heads"] = c.num_key_value_heads;
  j["head_dim"] = c.resolved_head_dim();
  j["hidden_act"] = "silu";
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["sliding_window"] = c.sliding_window ? nlohmann::json(*c.sliding_window) : nlohmann::json(nullptr);
  j["rope_theta"] = c.rope_theta;
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["initializer_range"] = c.init_std;
  if (!c.dense()) {
    j["num_local_experts"] = c.moe.num_experts;
    j["num_experts_per_tok"] = c.moe.num_experts_per_tok;
    j["router_aux_loss_coef"] = c.moe.aux_loss_coef;
    j["router_jitter_noise"] = c.moe.router_jitter;
    j["output_router_logits"] = false;
  }
  add_common_keys(j, c, torch_dtype);
  return j;
}

namespace {
int64_t get_int(const nlohmann::json& j, const std::string& key, const std::string& path,
                std::optional<int64_t> dflt = std::nullopt) {
  if (!j.contains(key) || j[key].is_null()) {
    if (dflt) return *dflt;
    throw UserError(path + ": key '" + key + "' is missing");
  }
  if (!j[key].is_number_integer()) throw UserError(path + ": key '" + key + "' must be an integer");
  return j[key].get<int64_t>();
}
double get_num(const nlohmann::json& j, const std::string& key, const std::string& path, double dflt) {
  if (!j.contains(key) || j[key].is_null()) return dflt;
  if (!j[key].is_number()) throw UserError(path + ": key '" + key + "' must be a number");
  return j[key].get<double>();
}
}  // namespace

ModelConfig from_hf_config(const nlohmann::json& j, const std::string& path) {
  if (!j.is_object()) throw UserError(path + ": expected a JSON object");
  if (j.contains("model_type") && !j["model_type"].is_string()) throw UserError(path + ": key 'model_type' must be a string");
  const std::string type = j.value("model_type", "");
  if (type != "mixtral" && type != "mistral" && type != "llama")
    throw UserError(path + ": key 'model_type' is '" + type +
                    "'; Mixtral checkpoints (mixtral) and dense Mistral or Llama ones (mistral, llama) can be imported");
  const bool dense = type != "mixtral";
  for (const char* k : {"attention_bias", "mlp_bias"})
    if (j.contains(k) && j[k] != false) throw UserError(path + ": key '" + k + "' is set; biases are not supported");
  if (j.contains("rope_scaling") && !j["rope_scaling"].is_null())
    throw UserError(path + ": key 'rope_scaling' is set; RoPE scaling is not supported");
  if (j.contains("hidden_act") && j["hidden_act"] != "silu")
    throw UserError(path + ": key 'hidden_act' must be 'silu' (SwiGLU experts)");
  ModelConfig c;
  c.vocab_size = get_int(j, "vocab_size", path);
  c.hidden_size = get_int(j, "hidden_size", path);
  c.intermediate_size = get_int(j, "intermediate_size", path);
  c.num_layers = get_int(j, "num_hidden_layers", path);
  c.num_attention_heads = get_int(j, "num_attention_heads", path);
  c.num_key_value_heads = get_int(j, "num_key_value_heads", path, c.num_attention_heads);
  if (j.contains("head_dim") && !j["head_dim"].is_null()) c.head_dim = get_int(j, "head_dim", path);
  c.max_position_embeddings = get_int(j, "max_position_embeddings", path, 32768);
  if (j.contains("sliding_window") && !j["sliding_window"].is_null()) c.sliding_window = get_int(j, "sliding_window", path);
  c.rope_theta = get_num(j, "rope_theta", path, dense ? 1e4 : 1e6);  // transformers' defaults per model type
  c.rms_norm_eps = get_num(j, "rms_norm_eps", path, dense ? 1e-6 : 1e-5);
  c.init_std = get_num(j, "initializer_range", path, 0.02);
  c.tie_word_embeddings = j.value("tie_word_embeddings", false);
  if (dense) {  // one expert (the MLP) for every token; nothing to balance
    c.moe.num_experts = 1;
    c.moe.num_experts_per_tok = 1;
    c.moe.balance = Balance::None;
    c.moe.aux_loss_coef = 0;
  } else {
    c.moe.num_experts = get_int(j, "num_local_experts", path, 8);
    c.moe.num_experts_per_tok = get_int(j, "num_experts_per_tok", path, 2);
    c.moe.aux_loss_coef = get_num(j, "router_aux_loss_coef", path, 0.001);
    c.moe.router_jitter = get_num(j, "router_jitter_noise", path, 0.0);
  }
  // Same checks as a YAML config, reported against config.json.
  try {
    io::validate_model_config(c, path);
  } catch (const UserError& e) {
    throw UserError(std::string(e.what()) + " (from the Hugging Face config)");
  }
  return c;
}

ModelConfig read_hf_config_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw UserError(path + ": not found");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception&) {
    throw UserError(path + ": invalid JSON");
  }
  return from_hf_config(j, path);
}

}  // namespace moeforge::io
