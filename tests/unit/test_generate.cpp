#include <gtest/gtest.h>
#include <torch/torch.h>

#include "model/decoder.h"
#include "core/error.h"
#include "model/generate.h"
#include "test_util.h"

using namespace moeforge;

namespace {
MixtralForCausalLM gen_model(std::optional<int64_t> window) {
  ModelConfig c = test::tiny_config();
  c.sliding_window = window;
  MixtralForCausalLM m(c);
  init_weights(*m, 0.3, 17);  // large weights: varied, confident logits
  m->eval();
  return m;
}
}  // namespace

TEST(Generate, GreedyWithCacheEqualsRecomputingTokenForToken) {
  for (std::optional<int64_t> window : {std::optional<int64_t>{}, std::optional<int64_t>{5}}) {
    auto m = gen_model(window);
    std::vector<int64_t> prompt{1, 7, 9, 22, 3, 40, 41};
    SamplingOptions o;
    o.max_new_tokens = 24;
    o.eos_id = -1;
    auto cached = generate(m, prompt, o);
    auto slow = generate_uncached_greedy(m, prompt, 24, -1);
    EXPECT_EQ(cached, slow) << (window ? "window" : "full");
    EXPECT_EQ(cached.size(), 24u);
  }
}

// With a window of 4 the cache holds 4 slots; feeding 20 tokens (a prompt of 7 longer than the window,
// then one at a time) gives the logits of full windowed attention over the whole sequence.
// In fp64: the rolling buffer keeps keys in slot order (p % window), so attention sums run in another
// order than in the full forward; in fp32 that rounding reaches ~1e-5 on these large logits.
TEST(Generate, RollingBufferEqualsFullWindowedAttention) {
  auto m = gen_model(4);
  m->to(torch::kDouble);
  torch::NoGradGuard ng;
  torch::manual_seed(5);
  auto ids = torch::randint(0, 64, {1, 20}, torch::kLong);
  auto full = m->forward(ids).logits;
  KVCache cache = m->make_cache(1, 20);
  EXPECT_EQ(cache.capacity, 4);
  auto first = m->forward_cached(ids.narrow(1, 0, 7), cache);
  EXPECT_LT(test::max_abs_diff(first, full.narrow(1, 0, 7)), 1e-10);
  for (int64_t t = 7; t < 20; ++t) {
    auto step = m->forward_cached(ids.narrow(1, t, 1), cache);
    EXPECT_LT(test::max_abs_diff(step[0][0], full[0][t]), 1e-10) << "position " << t;
  }
  EXPECT_EQ(cache.layers[0].pos.sizes(), torch::IntArrayRef({4}));
  EXPECT_EQ(cache.layers[0].pos.max().item<int64_t>(), 19);
  EXPECT_EQ(cache.layers[0].pos.min().item<int64_t>(), 16);
}

TEST(Generate, SamplingIsSeededAndTinyTopPIsGreedy) {
  auto m = gen_model({});
  std::vector<int64_t> prompt{1, 5, 6};
  SamplingOptions o;
  o.max_new_tokens = 12;
  o.eos_id = -1;
  o.temperature = 1.0;
  o.seed = 3;
  auto a = generate(m, prompt, o), b = generate(m, prompt, o);
  EXPECT_EQ(a, b);
  o.top_p = 1e-9;  // only the most likely token survives
  auto greedy_like = generate(m, prompt, o);
  EXPECT_EQ(greedy_like, generate_uncached_greedy(m, prompt, 12, -1));
  // Streaming sees every token in order.
  std::vector<int64_t> streamed;
  o.top_p = 1.0;
  auto c = generate(m, prompt, o, [&](int64_t t) { streamed.push_back(t); });
  EXPECT_EQ(streamed, c);
}

TEST(Generate, StopsAtEosAndChecksLength) {
  auto m = gen_model({});
  std::vector<int64_t> prompt{1, 5, 6};
  auto greedy = generate_uncached_greedy(m, prompt, 10, -1);
  SamplingOptions o;
  o.max_new_tokens = 10;
  o.eos_id = greedy[3];  // pretend the fourth greedy token is </s>
  auto out = generate(m, prompt, o);
  auto first_eos = std::find(greedy.begin(), greedy.end(), greedy[3]) - greedy.begin();
  std::vector<int64_t> expect(greedy.begin(), greedy.begin() + first_eos);
  EXPECT_EQ(out, expect);
  o.max_new_tokens = 1000;  // beyond max_position_embeddings (128) without a window
  EXPECT_THROW(generate(m, prompt, o), UserError);
}

// A tokenizer smaller than the embedding: ids from vocab_limit up are never produced, greedy or sampled; each
// greedy token is the argmax over the allowed rows of the logits computed by hand (the uncached forward).
TEST(Generate, VocabLimitNeverProducesRowsPastTheTokenizer) {
  auto m = gen_model({});
  std::vector<int64_t> prompt{1, 5, 6};
  const auto free = generate_uncached_greedy(m, prompt, 16, -1);
  const int64_t limit = *std::max_element(free.begin(), free.end());  // the largest id greedy picks is cut off
  ASSERT_GT(limit, 3);
  SamplingOptions o;
  o.max_new_tokens = 16;
  o.eos_id = -1;
  o.vocab_limit = limit;
  auto out = generate(m, prompt, o);
  ASSERT_EQ(out.size(), 16u);
  std::vector<int64_t> seq = prompt;
  torch::NoGradGuard ng;
  for (int64_t t : out) {
    auto logits = m->forward(torch::tensor(seq, torch::kLong).view({1, -1})).logits[0][-1];
    EXPECT_EQ(t, logits.narrow(0, 0, limit).argmax().item<int64_t>());
    seq.push_back(t);
  }
  o.temperature = 2.0;  // flat: every row likely, yet none past the limit
  o.seed = 9;
  o.max_new_tokens = 60;
  for (int64_t t : generate(m, prompt, o)) EXPECT_LT(t, limit);
}
