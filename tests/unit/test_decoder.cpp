#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
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

// The outputs against references computed here: the logits are the final hidden states times the LM head
// (a naive dot product), and every layer's routing statistics follow from its router logits by hand
// (top-k choices, gate weights = softmax over the chosen logits, counts per expert, mean entropy).
TEST(Decoder, OutputsAndRoutingStatistics) {
  ModelConfig c = test::tiny_config();
  MixtralForCausalLM m(c);
  init_weights(*m, c.init_std, 4);
  m->eval();
  torch::NoGradGuard ng;
  auto ids = torch::randint(0, c.vocab_size, {2, 6}, torch::kLong);
  auto out = m->forward(ids);
  ASSERT_EQ(out.logits.sizes(), torch::IntArrayRef({2, 6, c.vocab_size}));
  ASSERT_EQ(static_cast<int64_t>(out.router.size()), c.num_layers);
  auto h = out.hidden.to(torch::kDouble).reshape({12, c.hidden_size});
  auto w = m->lm_head_weight().to(torch::kDouble);
  auto lg = out.logits.to(torch::kDouble).reshape({12, c.vocab_size});
  for (int64_t t : {0, 5, 11})
    for (int64_t v : {int64_t{0}, int64_t{17}, c.vocab_size - 1}) {
      double dot = 0;
      for (int64_t i = 0; i < c.hidden_size; ++i) dot += h[t][i].item<double>() * w[v][i].item<double>();
      EXPECT_NEAR(lg[t][v].item<double>(), dot, 1e-4) << t << "," << v;
    }
  const int64_t E = c.moe.num_experts, K = c.moe.num_experts_per_tok;
  for (auto& r : out.router) {
    ASSERT_EQ(r.logits_NE.sizes(), torch::IntArrayRef({12, E}));
    auto L = r.logits_NE.to(torch::kDouble);
    std::vector<int64_t> count(static_cast<size_t>(E), 0);
    double entropy = 0;
    for (int64_t n = 0; n < 12; ++n) {
      std::vector<double> row(static_cast<size_t>(E));
      for (int64_t e = 0; e < E; ++e) row[static_cast<size_t>(e)] = L[n][e].item<double>();
      std::vector<int64_t> order(static_cast<size_t>(E));
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return row[a] > row[b]; });
      double zk = 0, z = 0, mx = row[static_cast<size_t>(order[0])];
      for (int64_t j = 0; j < K; ++j) zk += std::exp(row[static_cast<size_t>(order[j])] - mx);
      for (double x : row) z += std::exp(x - mx);
      for (int64_t j = 0; j < K; ++j) {
        EXPECT_EQ(r.topk_idx_NK[n][j].item<int64_t>(), order[j]) << "token " << n << " choice " << j;
        EXPECT_NEAR(r.topk_weight_NK[n][j].item<double>(), std::exp(row[static_cast<size_t>(order[j])] - mx) / zk, 1e-5);
        ++count[static_cast<size_t>(order[j])];
      }
      for (double x : row) {
        const double p = std::exp(x - mx) / z;
        entropy -= p * std::log(p) / 12.0;
      }
    }
    for (int64_t e = 0; e < E; ++e) EXPECT_EQ(r.tokens_per_expert[e].item<int64_t>(), count[static_cast<size_t>(e)]);
    EXPECT_NEAR(r.entropy.item<double>(), entropy, 1e-5);
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

// Router jitter draws from each router's own generator, seeded from the run seed: other uses of the global
// generator (building a reference model, an expert bank) do not move it, and the same seed gives the same noise.
TEST(Decoder, RouterJitterOwnsItsGenerator) {
  ModelConfig c = test::tiny_config();
  c.moe.router_jitter = 0.2;
  MixtralForCausalLM m(c);
  init_weights(*m, c.init_std, 4);
  m->train();
  torch::NoGradGuard ng;
  auto ids = torch::randint(0, c.vocab_size, {2, 6}, torch::kLong);
  auto logits_after = [&](uint64_t seed, uint64_t global_seed) {
    m->seed_router_jitter(seed);
    torch::manual_seed(global_seed);
    (void)torch::rand({100});  // someone else drawing from the global generator
    return m->forward(ids).router[0].logits_NE;
  };
  auto a = logits_after(5, 1), b = logits_after(5, 999), other = logits_after(6, 1);
  EXPECT_TRUE(torch::equal(a, b)) << "the global generator moved the jitter";
  EXPECT_FALSE(torch::equal(a, other)) << "another run seed gives other noise";
  m->eval();  // no noise at evaluation
  auto e1 = m->forward(ids).router[0].logits_NE;
  m->seed_router_jitter(77);
  EXPECT_TRUE(torch::equal(e1, m->forward(ids).router[0].logits_NE));
  // The generator's state round-trips (what a checkpoint stores).
  m->train();
  m->seed_router_jitter(5);
  auto& g = m->moe_blocks()[0]->gate->jitter_generator();
  const auto state = g.get_state();
  auto first = m->forward(ids).router[0].logits_NE;
  g.set_state(state);
  EXPECT_TRUE(torch::equal(first, m->forward(ids).router[0].logits_NE));
}
