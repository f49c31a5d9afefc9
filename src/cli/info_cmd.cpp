// moeforge info CONFIG [--json]: parameter counts and memory, from the config alone; info --keys: the key reference.
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <nlohmann/json.hpp>

#include "io/model_config_yaml.h"
#include "cli/cli.h"
#include "core/error.h"
#include "model/config.h"
#include "model/param_count.h"
#include "recipe/recipe_keys.h"

namespace moeforge::cli {

namespace {

std::string with_commas(int64_t v) {
  std::string s = std::to_string(v < 0 ? -v : v);
  for (int i = static_cast<int>(s.size()) - 3; i > 0; i -= 3) s.insert(static_cast<size_t>(i), ",");
  return v < 0 ? "-" + s : s;
}

std::string human_count(int64_t v) {
  char buf[32];
  double d = static_cast<double>(v);
  if (d >= 1e9) std::snprintf(buf, sizeof buf, "%.2fB", d / 1e9);
  else if (d >= 1e6) std::snprintf(buf, sizeof buf, "%.2fM", d / 1e6);
  else if (d >= 1e3) std::snprintf(buf, sizeof buf, "%.2fK", d / 1e3);
  else std::snprintf(buf, sizeof buf, "%.0f", d);
  return buf;
}

std::string gib(double bytes) {
  char buf[32];
  if (bytes >= 1024.0 * 1024 * 1024) std::snprintf(buf, sizeof buf, "%.2f GiB", bytes / (1024.0 * 1024 * 1024));
  else std::snprintf(buf, sizeof buf, "%.2f MiB", bytes / (1024.0 * 1024));
  return buf;
}

}  // namespace

// `info --keys`: every key of a model config and of a recipe, with its type, default and meaning, from the
// declarations that parsing and the YAML writer use (docs/keys.md is this output).
static int print_keys(bool json) {
  const ModelConfig model_defaults;
  const train::Recipe recipe_defaults;
  const auto model = io::model_config_keys().reference(model_defaults);
  const auto recipe = train::recipe_keys().reference(recipe_defaults);
  if (json) {
    nlohmann::json j;
    for (const auto* set : {&model, &recipe}) {
      auto& out = j[set == &model ? "model" : "recipe"];
      out = nlohmann::json::array();
      for (const auto& k : *set)
        out.push_back({{"key", k.name}, {"type", k.type}, {"default", k.default_value}, {"help", k.help}});
    }
    std::cout << j.dump(1) << "\n";
    return 0;
  }
  std::cout << train::key_reference_markdown();
  return 0;
}

int cmd_info(const Args& in) {
  Args args = in;
  const bool json = take_flag(args, "--json");
  const bool keys = take_flag(args, "--keys");
  auto overrides = take_repeated(args, "--set");
  std::string method, rank_s, precision = "bf16";
  take_option(args, "--finetune", &method);
  take_option(args, "--rank", &rank_s);
  take_option(args, "--precision", &precision);
  reject_unknown_flags(args, "info", {"--json", "--set", "--keys", "--finetune", "--rank", "--precision"});
  if (!method.empty() && method != "full" && method != "lora" && method != "qlora")
    throw UserError("info: --finetune must be full, lora or qlora, got '" + method + "'");
  if (precision != "bf16" && precision != "fp32") throw UserError("info: --precision must be bf16 or fp32, got '" + precision + "'");
  if (keys) {
    if (!args.empty() || !overrides.empty()) throw UserError("info --keys: takes no CONFIG (usage: moeforge info --keys [--json])");
    return print_keys(json);
  }
  if (args.size() != 1) throw UserError("info: expected one CONFIG file (usage: moeforge info CONFIG [--json] | info --keys)");
  const std::string path = args[0];
  ModelConfig c = io::load_model_config(path, overrides);
  ParamCounts p = count_params(c);
  MemoryEstimate m = estimate_memory(p);

  FinetuneSpec ft;
  ft.method = method.empty() ? "full" : method;
  if (!rank_s.empty()) {
    char* end = nullptr;
    const long r = std::strtol(rank_s.c_str(), &end, 10);
    if (rank_s.empty() || *end || r <= 0) throw UserError("info: --rank must be a positive integer, got '" + rank_s + "'");
    ft.lora.rank = r;
    ft.lora.alpha = 2.0 * r;
  }
  const FinetuneEstimate fe = estimate_finetune(c, ft, precision == "bf16");

  if (json) {
    nlohmann::json j;
    if (ft.adapters())
      j["finetune"] = {{"method", ft.method},          {"rank", ft.lora.rank},
                       {"targets", ft.lora.targets},    {"trainable_params", fe.trainable},
                       {"base_bytes", fe.base_bytes},   {"quant_overhead_bytes", fe.quant_overhead},
                       {"adapter_bytes", fe.adapter_bytes}, {"grad_bytes", fe.grad_bytes},
                       {"optimizer_bytes", fe.optimizer_bytes}, {"total_bytes", fe.total}};
    j["config"] = path;
    j["name"] = c.name;
    j["total_params"] = p.total;
    j["active_params"] = p.active;
    j["params"] = {{"embedding", p.embedding}, {"attention", p.attention}, {"router", p.router},
                   {"experts", p.experts},     {"per_expert", p.per_expert}, {"shared", p.shared}, {"norms", p.norms},
                   {"lm_head", p.lm_head}};
    j["memory_bytes"] = {{"weights_bf16", m.weights_bf16}, {"weights_fp32", m.weights_fp32},
                         {"grads_bf16", m.grads_bf16},     {"grads_fp32", m.grads_fp32},
                         {"adamw_state_fp32", m.adamw_fp32}, {"train_mixed_bf16", m.mixed_bf16_total},
                         {"train_fp32", m.fp32_total}};
    j["num_layers"] = c.num_layers;
    j["num_experts"] = c.moe.num_experts;
    j["num_experts_per_tok"] = c.moe.num_experts_per_tok;
    j["num_shared_experts"] = c.moe.num_shared_experts;
    std::cout << j.dump() << "\n";
    return 0;
  }
  std::printf("%s (%s)\n", c.name.c_str(), path.c_str());
  std::printf("  layers %ld, hidden %ld, intermediate %ld, heads %ld/%ld kv, head_dim %ld, vocab %ld\n",
              (long)c.num_layers, (long)c.hidden_size, (long)c.intermediate_size, (long)c.num_attention_heads,
              (long)c.num_key_value_heads, (long)c.resolved_head_dim(), (long)c.vocab_size);
  std::printf("  experts %ld, top-%ld%s, balance %s, sliding window %s\n", (long)c.moe.num_experts,
              (long)c.moe.num_experts_per_tok,
              c.moe.num_shared_experts > 0
                  ? (", shared " + std::to_string(c.moe.num_shared_experts) + (c.moe.shared_expert_gate ? " (gated)" : "")).c_str()
                  : "",
              balance_name(c.moe.balance),
              c.sliding_window ? std::to_string(*c.sliding_window).c_str() : "off");
  std::printf("  total parameters   %20s  (%s)\n", with_commas(p.total).c_str(), human_count(p.total).c_str());
  std::printf("  active parameters  %20s  (%s per token)\n", with_commas(p.active).c_str(),
              human_count(p.active).c_str());
  std::printf("    embedding %s, attention %s, router %s, experts %s, %snorms %s, lm_head %s\n",
              human_count(p.embedding).c_str(), human_count(p.attention).c_str(), human_count(p.router).c_str(),
              human_count(p.experts).c_str(), p.shared ? ("shared experts " + human_count(p.shared) + ", ").c_str() : "",
              human_count(p.norms).c_str(), human_count(p.lm_head).c_str());
  std::printf("  memory: weights %s bf16 / %s fp32; gradients %s bf16 / %s fp32; AdamW state %s fp32\n",
              gib(m.weights_bf16).c_str(), gib(m.weights_fp32).c_str(), gib(m.grads_bf16).c_str(),
              gib(m.grads_fp32).c_str(), gib(m.adamw_fp32).c_str());
  std::printf("  training (weights + grads + optimizer, no activations): %s bf16 mixed, %s fp32\n",
              gib(m.mixed_bf16_total).c_str(), gib(m.fp32_total).c_str());
  if (ft.adapters()) {
    std::string targets;
    for (const auto& t : ft.lora.targets) targets += (targets.empty() ? "" : ",") + t;
    std::printf("  fine-tuning %s, rank %ld on %s (%s compute):\n", ft.method.c_str(), (long)ft.lora.rank,
                targets.c_str(), precision.c_str());
    std::printf("    trainable parameters %s (%s, %.3f%% of the model)\n", with_commas(fe.trainable).c_str(),
                human_count(fe.trainable).c_str(), 100.0 * fe.trainable / p.total);
    std::printf("    frozen base %s%s; adapters %s + gradients %s + AdamW state %s\n", gib(fe.base_bytes).c_str(),
                ft.quantized() ? (" (" + quant_type_name(ft.quant.type) + ", of which absmax " + gib(fe.quant_overhead) + ")").c_str()
                               : "",
                gib(fe.adapter_bytes).c_str(), gib(fe.grad_bytes).c_str(), gib(fe.optimizer_bytes).c_str());
    std::printf("    total (no activations): %s\n", gib(fe.total).c_str());
  }
  return 0;
}

}  // namespace moeforge::cli
