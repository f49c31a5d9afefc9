// Config keys declared once: every declared key is parsed, written and documented from its one declaration,
// and docs/keys.md is the current reference.
#include <gtest/gtest.h>

#include <fstream>
#include <set>
#include <sstream>
#include <yaml-cpp/yaml.h>

#include "core/error.h"
#include "io/model_config_yaml.h"
#include "test_util.h"
#include "recipe/recipe.h"
#include "recipe/recipe_keys.h"

using namespace moeforge;

namespace {
// Dotted names of every scalar (or list) in a YAML mapping.
void leaves(const YAML::Node& n, const std::string& prefix, std::set<std::string>& out) {
  for (auto it = n.begin(); it != n.end(); ++it) {
    const std::string k = prefix + it->first.as<std::string>();
    if (it->second.IsMap()) leaves(it->second, k + ".", out);
    else out.insert(k);
  }
}
}  // namespace

TEST(Keys, WriterEmitsExactlyTheDeclaredModelKeys) {
  std::set<std::string> declared, written;
  for (const auto& k : io::model_config_keys().keys()) declared.insert(k.name);
  leaves(YAML::Load(io::model_config_to_yaml(ModelConfig{})), "", written);
  EXPECT_EQ(declared, written);
}

// The writers produce, byte for byte, what the hand-written ones produced before the keys were declared once
// (tests/data/golden, written at 9f0fea7 from the same recipe, plus the keys added since, each a line after the
// key before it: moe.bias_update, moe.seq_aux_loss_coef, moe.balance_scope, moe.num_shared_experts,
// moe.shared_expert_gate; train.skip_samples): run directories and checkpoints keep their format, and
// the DPO reference fingerprint (which hashes the model YAML) changes only when keys are added.
TEST(Keys, WritersMatchTheFilesWrittenBefore) {
  auto read = [](const std::string& rel) {
    std::ifstream in(test::source_path(rel));
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  };
  const std::string recipe = read("tests/data/golden/recipe.yaml");
  ASSERT_FALSE(recipe.empty());
  auto r = train::load_recipe(test::write_temp("golden_recipe.yaml", recipe), {});
  EXPECT_EQ(r.yaml, read("tests/data/golden/recipe.resolved.yaml"));
  EXPECT_EQ(io::model_config_to_yaml(r.model), read("tests/data/golden/model.yaml"));
}

TEST(Keys, EveryModelKeyRoundTripsANonDefaultValue) {
  ModelConfig c;
  c.name = "x";
  c.vocab_size = 77;
  c.hidden_size = 48;
  c.intermediate_size = 96;
  c.num_layers = 3;
  c.num_attention_heads = 6;
  c.num_key_value_heads = 3;
  c.head_dim = 10;
  c.max_position_embeddings = 99;
  c.sliding_window = 5;
  c.rope_theta = 123.5;
  c.rms_norm_eps = 3e-7;
  c.tie_word_embeddings = true;
  c.init_std = 0.07;
  c.moe = {6, 3, 0.125, 0.25, 0.5, Balance::AuxFreeBias, 0.0625, BiasUpdate::Proportional, 0.375, BalanceScope::GlobalBatch, 2, false};
  const std::string y = io::model_config_to_yaml(c);
  const ModelConfig b = io::parse_model_config(YAML::Load(y), "rt.yaml");
  EXPECT_EQ(io::model_config_to_yaml(b), y);
  EXPECT_EQ(b.moe.balance, Balance::AuxFreeBias);
  EXPECT_EQ(b.head_dim.value(), 10);
  EXPECT_EQ(b.sliding_window.value(), 5);
  EXPECT_TRUE(b.tie_word_embeddings);
  EXPECT_DOUBLE_EQ(b.rms_norm_eps, 3e-7);
  EXPECT_DOUBLE_EQ(b.moe.bias_update_rate, 0.0625);
  EXPECT_EQ(b.moe.bias_update, BiasUpdate::Proportional);
  EXPECT_DOUBLE_EQ(b.moe.seq_aux_loss_coef, 0.375);
  EXPECT_EQ(b.moe.balance_scope, BalanceScope::GlobalBatch);
  EXPECT_EQ(b.moe.num_shared_experts, 2);
  EXPECT_FALSE(b.moe.shared_expert_gate);
  // Every line of the YAML carries one of the values set above (no key fell back to its default).
  ModelConfig d;
  for (const auto& k : io::model_config_keys().keys()) {
    YAML::Emitter a, dflt;
    k.write(a, b);
    k.write(dflt, d);
    EXPECT_STRNE(a.c_str(), dflt.c_str()) << k.name << " kept its default";
  }
}

TEST(Keys, ValidateNamesTheKeyWithoutYaml) {
  ModelConfig c;
  c.moe.num_experts_per_tok = 9;
  try {
    io::validate_model_config(c, "config.json");
    FAIL();
  } catch (const UserError& e) {
    EXPECT_STREQ(e.what(), "config.json: key 'moe.num_experts_per_tok': top-k 9 exceeds moe.num_experts (8)");
  }
  c = ModelConfig{};
  c.rms_norm_eps = 0;
  try {
    io::validate_model_config(c, "config.json");
    FAIL();
  } catch (const UserError& e) {
    EXPECT_STREQ(e.what(), "config.json: key 'rms_norm_eps': must be positive, got 0");
  }
  EXPECT_NO_THROW(io::validate_model_config(ModelConfig{}, "config.json"));
}

TEST(Keys, RecipeWriterEmitsEveryDeclaredKey) {
  std::set<std::string> declared, written;
  for (const auto& k : train::recipe_keys().keys())
    if (k.name != "model") declared.insert(k.name);
  YAML::Node y = YAML::Load(train::recipe_keys().emit(train::Recipe{}));
  ASSERT_TRUE(y["model"].IsMap());
  y.remove("model");
  leaves(y, "", written);
  EXPECT_EQ(declared, written);
  // The resolved recipe of a real recipe names its model inline, whole.
  const auto cfg = test::source_path("configs/tiny.yaml");
  auto r = train::load_recipe(test::write_temp("keys_recipe.yaml", "model: " + cfg + "\ndata: {dir: /tmp/x}\n"), {});
  YAML::Node resolved = YAML::Load(r.yaml);
  EXPECT_EQ(resolved["model"]["hidden_size"].as<int>(), 128);
  EXPECT_EQ(resolved["model_source"].as<std::string>(), cfg);
  EXPECT_EQ(resolved["optim"]["betas"][1].as<double>(), 0.95);
}

TEST(Keys, DocsPageIsTheCurrentReference) {
  std::ifstream in(test::source_path("docs/keys.md"));
  ASSERT_TRUE(in) << "docs/keys.md is missing: build/moeforge info --keys > docs/keys.md";
  std::stringstream ss;
  ss << in.rdbuf();
  EXPECT_EQ(ss.str(), train::key_reference_markdown()) << "regenerate: build/moeforge info --keys > docs/keys.md";
  // Every key of both tables is documented with its help text.
  for (const auto* t : {&io::model_config_keys().keys()})
    for (const auto& k : *t) EXPECT_FALSE(k.help.empty()) << k.name;
  for (const auto& k : train::recipe_keys().keys()) EXPECT_FALSE(k.help.empty()) << k.name;
}
