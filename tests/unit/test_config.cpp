#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <string>

#include "io/model_config_yaml.h"
#include "core/error.h"
#include "model/config.h"
#include "test_util.h"

using namespace moeforge;
using moeforge::test::write_temp;

namespace {

const char* kGood = R"(name: t
vocab_size: 64
hidden_size: 32
intermediate_size: 48
num_layers: 2
num_attention_heads: 4
num_key_value_heads: 2
max_position_embeddings: 128
sliding_window: null
rope_theta: 10000.0
rms_norm_eps: 1.0e-6
tie_word_embeddings: false
init_std: 0.02
moe:
  num_experts: 4
  num_experts_per_tok: 2
  aux_loss_coef: 0.01
  z_loss_coef: 0.001
  router_jitter: 0.0
  balance: aux_loss
  bias_update_rate: 0.001
)";

// Replaces the first occurrence of `from` in the good config.
std::string variant(const std::string& from, const std::string& to) {
  std::string s = kGood;
  auto pos = s.find(from);
  EXPECT_NE(pos, std::string::npos) << from;
  s.replace(pos, from.size(), to);
  return s;
}

// Parses `text` and returns the UserError message ("" when it parsed).
std::string error_of(const std::string& text) {
  auto path = write_temp("cfg.yaml", text);
  try {
    io::load_model_config(path);
  } catch (const UserError& e) {
    std::remove(path.c_str());
    return e.what();
  }
  std::remove(path.c_str());
  return "";
}

void expect_error(const std::string& text, const std::vector<std::string>& needles) {
  std::string msg = error_of(text);
  ASSERT_FALSE(msg.empty()) << "expected an error for:\n" << text;
  EXPECT_NE(msg.find("cfg.yaml"), std::string::npos) << msg;  // names the file
  EXPECT_EQ(msg.find('\n'), std::string::npos) << "one line: " << msg;
  for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "'" << n << "' not in: " << msg;
}

}  // namespace

TEST(Config, GoodConfigParses) {
  auto path = write_temp("good.yaml", kGood);
  ModelConfig c = io::load_model_config(path);
  EXPECT_EQ(c.hidden_size, 32);
  EXPECT_EQ(c.resolved_head_dim(), 8);
  EXPECT_FALSE(c.sliding_window.has_value());
  EXPECT_EQ(c.moe.num_experts, 4);
  EXPECT_DOUBLE_EQ(c.moe.z_loss_coef, 0.001);
  EXPECT_EQ(c.moe.balance, Balance::AuxLoss);
  std::remove(path.c_str());
}

TEST(Config, UnknownKeySuggestsClosest) {
  expect_error(variant("hidden_size: 32", "hiden_size: 32"), {"unknown key 'hiden_size'", "did you mean 'hidden_size'", ":3:"});
  expect_error(variant("  num_experts: 4", "  num_expert: 4"), {"unknown key 'moe.num_expert'", "did you mean 'num_experts'"});
}

TEST(Config, WrongTypeNamesKey) {
  expect_error(variant("hidden_size: 32", "hidden_size: big"), {"key 'hidden_size'", "expected an integer", "'big'"});
  expect_error(variant("rope_theta: 10000.0", "rope_theta: [1, 2]"), {"key 'rope_theta'", "expected a number"});
  expect_error(variant("tie_word_embeddings: false", "tie_word_embeddings: maybe"),
               {"key 'tie_word_embeddings'", "true or false"});
  expect_error(variant("balance: aux_loss", "balance: auxloss"), {"key 'moe.balance'", "did you mean 'aux_loss'"});
  expect_error(variant("moe:\n  num_experts: 4", "moe: 3\nx:\n  num_experts: 4"), {"key 'moe'", "expected a mapping"});
}

TEST(Config, ImpossibleValues) {
  expect_error(variant("num_experts_per_tok: 2", "num_experts_per_tok: 5"),
               {"key 'moe.num_experts_per_tok'", "exceeds moe.num_experts"});
  expect_error(variant("num_key_value_heads: 2", "num_key_value_heads: 3"),
               {"key 'num_key_value_heads'", "not divisible"});
  expect_error(variant("hidden_size: 32", "hidden_size: 30"),
               {"key 'num_attention_heads'", "not divisible by num_attention_heads"});
  expect_error(variant("hidden_size: 32", "hidden_size: 0"), {"key 'hidden_size'", "must be positive"});
  expect_error(variant("intermediate_size: 48", "intermediate_size: -4"), {"key 'intermediate_size'", "must be positive"});
  expect_error(variant("sliding_window: null", "sliding_window: 0"), {"key 'sliding_window'", "must be positive"});
  expect_error(variant("aux_loss_coef: 0.01", "aux_loss_coef: -1"), {"key 'moe.aux_loss_coef'"});
  expect_error(variant("router_jitter: 0.0", "router_jitter: 1.5"), {"key 'moe.router_jitter'"});
}

TEST(Config, HeadDimLiftsDivisibility) {
  // hidden 30 is not divisible by 4 heads, but with head_dim given that is fine.
  std::string s = variant("hidden_size: 32", "hidden_size: 30\nhead_dim: 8");
  EXPECT_EQ(error_of(s), "");
  expect_error(variant("hidden_size: 32", "hidden_size: 32\nhead_dim: 7"), {"key 'head_dim'", "even"});
}

TEST(Config, SyntaxErrorAndMissingFile) {
  expect_error("hidden_size: [1, 2\n", {"YAML syntax error"});
  try {
    io::load_model_config("/nonexistent/dir/cfg.yaml");
    FAIL() << "no error";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent/dir/cfg.yaml"), std::string::npos);
  }
}

TEST(Config, OverridesApply) {
  auto path = write_temp("ovr.yaml", kGood);
  ModelConfig c = io::load_model_config(path, {"moe.num_experts=8", "sliding_window=16", "name=x"});
  EXPECT_EQ(c.moe.num_experts, 8);
  EXPECT_EQ(c.sliding_window.value(), 16);
  EXPECT_EQ(c.name, "x");
  EXPECT_THROW(io::load_model_config(path, {"moe.num_expertz=8"}), UserError);
  EXPECT_THROW(io::load_model_config(path, {"novalue"}), UserError);
  std::remove(path.c_str());
}

TEST(Config, YamlRoundTrip) {
  auto path = write_temp("rt.yaml", kGood);
  ModelConfig a = io::load_model_config(path, {"sliding_window=8", "head_dim=16"});
  auto path2 = write_temp("rt2.yaml", io::model_config_to_yaml(a));
  ModelConfig b = io::load_model_config(path2);
  EXPECT_EQ(io::model_config_to_yaml(a), io::model_config_to_yaml(b));
  EXPECT_EQ(b.sliding_window.value(), 8);
  EXPECT_EQ(b.head_dim.value(), 16);
  std::remove(path.c_str());
  std::remove(path2.c_str());
}

TEST(Config, ShippedConfigsParse) {
  for (const char* name : {"tiny", "small", "mixtral-8x7b", "mixtral-8x22b"}) {
    ModelConfig c = io::load_model_config(test::source_path(std::string("configs/") + name + ".yaml"));
    EXPECT_GT(c.num_layers, 0) << name;
  }
}

// The CLI turns a bad config into one line on stderr and exit status 2.
TEST(Config, CliExitsWithStatus2) {
  auto path = write_temp("cli.yaml", variant("hidden_size: 32", "hiden_size: 32"));
  std::string err = path + ".err";
  std::string cmd = std::string(MOEFORGE_BINARY) + " info " + path + " 2>" + err + " >/dev/null";
  int rc = std::system(cmd.c_str());
  ASSERT_TRUE(WIFEXITED(rc));
  EXPECT_EQ(WEXITSTATUS(rc), 2);
  std::ifstream in(err);
  std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(std::count(all.begin(), all.end(), '\n'), 1) << all;
  EXPECT_NE(all.find("did you mean 'hidden_size'"), std::string::npos) << all;
  std::remove(path.c_str());
  std::remove(err.c_str());
}
