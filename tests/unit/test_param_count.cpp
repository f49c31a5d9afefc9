#include <gtest/gtest.h>

#include "io/model_config_yaml.h"
#include "model/config.h"
#include "model/decoder.h"
#include "model/param_count.h"
#include "test_util.h"

using namespace moeforge;

namespace {
ModelConfig shipped(const std::string& name) {
  return io::load_model_config(test::source_path("configs/" + name + ".yaml"));
}
int64_t allocated_numel(const ModelConfig& c) {
  MixtralForCausalLM m(c);
  int64_t n = 0;
  for (const auto& p : m->parameters()) n += p.numel();
  return n;
}
}  // namespace

TEST(ParamCount, Mixtral8x7BExact) {
  ParamCounts p = count_params(shipped("mixtral-8x7b"));
  EXPECT_EQ(p.total, 46702792704LL);
  EXPECT_EQ(p.active, 12879925248LL);
}

TEST(ParamCount, Mixtral8x22B) {
  ParamCounts p = count_params(shipped("mixtral-8x22b"));
  // Published: about 141B total, 39B active.
  EXPECT_NEAR(static_cast<double>(p.total) / 1e9, 140.6, 0.05);
  EXPECT_NEAR(static_cast<double>(p.active) / 1e9, 39.2, 0.05);
  // By hand: per layer attention 2*6144^2 + 2*6144*1024, experts 8*3*6144*16384, router 8*6144, norms 2*6144.
  const int64_t per_layer = 2LL * 6144 * 6144 + 2LL * 6144 * 1024 + 8LL * 3 * 6144 * 16384 + 8 * 6144 + 2 * 6144;
  EXPECT_EQ(p.total, 56 * per_layer + 2LL * 32000 * 6144 + 6144);
}

// The closed-form count equals the numel of an allocated model (tiny and small shapes, tied and untied, head_dim).
TEST(ParamCount, MatchesAllocatedModel) {
  ModelConfig tiny = shipped("tiny");
  EXPECT_EQ(count_params(tiny).total, allocated_numel(tiny));
  ModelConfig small = shipped("small");
  EXPECT_EQ(count_params(small).total, allocated_numel(small));
  ModelConfig odd = test::tiny_config();
  odd.tie_word_embeddings = true;
  odd.head_dim = 12;  // q_dim 48 != hidden 32
  odd.moe.num_experts = 3;
  odd.moe.num_experts_per_tok = 3;
  EXPECT_EQ(count_params(odd).total, allocated_numel(odd));
  EXPECT_EQ(count_params(odd).lm_head, 0);
  // With k == E every parameter is active.
  EXPECT_EQ(count_params(odd).active, count_params(odd).total);
}

TEST(ParamCount, ActiveCountsKExperts) {
  ModelConfig c = test::tiny_config();
  ParamCounts p = count_params(c);
  const int64_t per_expert = 3 * c.hidden_size * c.intermediate_size;
  EXPECT_EQ(p.total - p.active, c.num_layers * (c.moe.num_experts - c.moe.num_experts_per_tok) * per_expert);
  MemoryEstimate m = estimate_memory(p);
  EXPECT_DOUBLE_EQ(m.weights_bf16, 2.0 * p.total);
  EXPECT_DOUBLE_EQ(m.adamw_fp32, 8.0 * p.total);
}

// Shared experts: S x I wide, 3 H S I per layer plus the gate's H, all active.
TEST(ParamCount, SharedExpertsByHand) {
  ModelConfig c = test::tiny_config();
  c.moe.num_shared_experts = 2;
  const int64_t H = c.hidden_size, I = c.intermediate_size, L = c.num_layers;
  ParamCounts p = count_params(c), q = count_params(test::tiny_config());
  EXPECT_EQ(p.shared, L * (3 * H * 2 * I + H));
  EXPECT_EQ(p.total - q.total, p.shared);
  EXPECT_EQ(p.active - q.active, p.shared);
  EXPECT_EQ(p.total, allocated_numel(c));
  c.moe.shared_expert_gate = false;
  EXPECT_EQ(count_params(c).shared, L * 3 * H * 2 * I);
  EXPECT_EQ(count_params(c).total, allocated_numel(c));
}

TEST(ParamCount, ShapesListTheModelsParametersInOrder) {
  for (int variant = 0; variant < 4; ++variant) {
    const bool tied = variant % 2 == 1;
    ModelConfig c = test::tiny_config();
    c.tie_word_embeddings = tied;
    if (variant >= 2) c.moe.num_shared_experts = 1, c.moe.shared_expert_gate = variant == 2;
    MixtralForCausalLM m(c);
    auto expected = m->named_parameters();
    auto shapes = parameter_shapes(c);
    ASSERT_EQ(shapes.size(), expected.size());
    size_t i = 0;
    for (const auto& p : expected) {
      EXPECT_EQ(shapes[i].first, p.key());
      EXPECT_EQ(shapes[i].second, p.value().sizes().vec()) << p.key();
      ++i;
    }
  }
}
