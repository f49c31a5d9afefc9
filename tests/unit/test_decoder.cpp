#include <gtest/gtest.h>
#include <torch/torch.h>

#include <regex>
#include <set>

#include "model/decoder.h"
#include "test_util.h"

using namespace moeforge;

TEST(Decoder, ParameterNamesAreHuggingFaceMixtral) {
  ModelConfig c = test::tiny_config();
  MixtralForCausalLM m(c);
  std::set<std::string> names;
  for (auto& p : m->named_parameters()) names.insert(p.key());
  std::set<std::string> expected{"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"};
  for (int l = 0; l < c.num_layers; ++l) {
    std::string pre = "model.layers." + std::to_string(l) + ".";
    for (auto s : {"self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                   "self_attn.o_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight",
                   "block_sparse_moe.gate.weight"})
      expected.insert(pre + s);
    for (int e = 0; e < c.moe.num_experts; ++e)
      for (auto w : {"w1", "w2", "w3"})
        expected.insert(pre + "block_sparse_moe.experts." + std::to_string(e) + "." + w + ".weight");
  }
  EXPECT_EQ(names, expected);
  // Shapes as in HF: w1/w3 [I, H], w2 [H, I], gate [E, H], k_proj [kv_heads * head_dim, H].
  auto params = m->named_parameters();
  EXPECT_EQ(params["model.layers.1.block_sparse_moe.experts.3.w1.weight"].sizes(),
            torch::IntArrayRef({c.intermediate_size, c.hidden_size}));
  EXPECT_EQ(params["model.layers.1.block_sparse_moe.experts.3.w2.weight"].sizes(),
            torch::IntArrayRef({c.hidden_size, c.intermediate_size}));
  EXPECT_EQ(params["model.layers.0.block_sparse_moe.gate.weight"].sizes(),
            torch::IntArrayRef({c.moe.num_experts, c.hidden_size}));
  EXPECT_EQ(params["model.layers.0.self_attn.k_proj.weight"].sizes(), torch::IntArrayRef({c.kv_dim(), c.hidden_size}));
}

TEST(Decoder, TiedEmbeddingsHaveNoLmHead) {
  ModelConfig c = test::tiny_config();
  c.tie_word_embeddings = true;
  MixtralForCausalLM m(c);
  EXPECT_FALSE(m->named_parameters().contains("lm_head.weight"));
  init_weights(*m, 0.02, 1);
  torch::NoGradGuard ng;
  auto ids = torch::randint(0, c.vocab_size, {1, 4}, torch::kLong);
  auto out = m->forward(ids);
  auto ref = torch::matmul(out.hidden, m->model->embed_tokens->weight.t());
  EXPECT_LT(test::max_abs_diff(out.logits, ref), 1e-6);
}

TEST(Decoder, InitIsDeterministicFromSeed) {
  ModelConfig c = test::tiny_config();
  MixtralForCausalLM a(c), b(c), d(c);
  torch::manual_seed(1);  // the global RNG must not matter
  init_weights(*a, c.init_std, 42);
  torch::manual_seed(2);
  init_weights(*b, c.init_std, 42);
  init_weights(*d, c.init_std, 43);
  auto pa = a->named_parameters(), pb = b->named_parameters(), pd = d->named_parameters();
  bool any_diff = false;
  for (auto& p : pa) {
    EXPECT_TRUE(torch::equal(p.value(), pb[p.key()])) << p.key();
    if (!torch::equal(p.value(), pd[p.key()])) any_diff = true;
  }
  EXPECT_TRUE(any_diff);
  EXPECT_TRUE(torch::equal(pa["model.norm.weight"], torch::ones({c.hidden_size})));
  double std = pa["model.layers.0.block_sparse_moe.experts.0.w1.weight"].std().item<double>();
  EXPECT_NEAR(std, c.init_std, 0.2 * c.init_std);
}

TEST(Decoder, OutputsAndRoutingStatistics) {
  ModelConfig c = test::tiny_config();
  MixtralForCausalLM m(c);
  init_weights(*m, c.init_std, 4);
  auto ids = torch::randint(0, c.vocab_size, {2, 6}, torch::kLong);
  auto out = m->forward(ids);
  EXPECT_EQ(out.logits.sizes(), torch::IntArrayRef({2, 6, c.vocab_size}));
  ASSERT_EQ(static_cast<int64_t>(out.router.size()), c.num_layers);
  for (auto& r : out.router) {
    EXPECT_EQ(r.logits_NE.sizes(), torch::IntArrayRef({12, c.moe.num_experts}));
    EXPECT_EQ(r.tokens_per_expert.sum().item<int64_t>(), 12 * c.moe.num_experts_per_tok);
    double h = r.entropy.item<double>();
    EXPECT_GT(h, 0.0);
    EXPECT_LE(h, std::log(static_cast<double>(c.moe.num_experts)) + 1e-6);
  }
}

TEST(Decoder, PackedSegmentsEqualSeparateSequences) {
  // Two documents packed in one row with restarting positions and segment ids give the same
  // logits as each document alone.
  ModelConfig c = test::tiny_config();
  MixtralForCausalLM m(c);
  init_weights(*m, c.init_std, 9);
  m->eval();
  torch::NoGradGuard ng;
  auto a = torch::randint(0, c.vocab_size, {1, 4}, torch::kLong);
  auto b = torch::randint(0, c.vocab_size, {1, 3}, torch::kLong);
  ForwardInputs in;
  in.input_ids = torch::cat({a, b}, 1);
  in.position_ids = torch::tensor({0, 1, 2, 3, 0, 1, 2}, torch::kLong).view({1, 7});
  in.segment_ids = torch::tensor({0, 0, 0, 0, 1, 1, 1}, torch::kLong).view({1, 7});
  auto packed = m->forward(in).logits;
  auto la = m->forward(a).logits, lb = m->forward(b).logits;
  EXPECT_LT(test::max_abs_diff(packed.narrow(1, 0, 4), la), 1e-5);
  EXPECT_LT(test::max_abs_diff(packed.narrow(1, 4, 3), lb), 1e-5);
}
