#include <gtest/gtest.h>
#include <torch/torch.h>

#include <fstream>

#include "core/error.h"
#include "corpus.h"
#include "data/sft_dataset.h"
#include "model/decoder.h"
#include "test_util.h"
#include "objective/sft_objective.h"

using namespace moeforge;
using namespace moeforge::data;

namespace {
TokenizedExample example(std::vector<int> ids, std::vector<uint8_t> mask) { return TokenizedExample{ids, mask}; }

MixtralForCausalLM sft_model() {
  ModelConfig c = test::tiny_config();
  c.moe.aux_loss_coef = 0.0;
  MixtralForCausalLM m(c);
  init_weights(*m, 0.2, 8);
  return m;
}
}  // namespace

// The packed row's loss equals the examples' losses computed one by one (token-weighted), and no token
// attends across examples.
TEST(Sft, PackedRowEqualsExamplesOneByOne) {
  // In fp64: the packed row and the examples alone reach the experts in groups of different sizes, so their
  // GEMMs round differently (fp32: ~1e-6 on these logits); in fp64 only the semantics can differ.
  auto m = sft_model();
  m->to(torch::kDouble);
  std::vector<TokenizedExample> ex{example({1, 5, 6, 7, 8}, {0, 0, 1, 1, 1}), example({1, 9, 10, 2}, {0, 0, 1, 1}),
                                   example({1, 11, 12}, {0, 1, 1})};
  auto rows = pack_rows(ex, 12);
  ASSERT_EQ(rows.size(), 1u);  // 4 + 3 + 2 = 9 predictions fit in 12
  auto packed = make_packed_batch(ex, rows, 12);
  torch::Tensor lp_logits, l_logits, lp2_logits;
  auto lp = train::sft_loss(m, packed, torch::kCPU, -1, &lp_logits);
  double sum = 0;
  int64_t n = 0;
  for (size_t i = 0; i < ex.size(); ++i) {
    const int64_t len = static_cast<int64_t>(ex[i].ids.size()) - 1;
    auto one = make_packed_batch(ex, {{i}}, len);
    auto l = train::sft_loss(m, one, torch::kCPU, -1, &l_logits);
    sum += l.loss * static_cast<double>(l.tokens);
    n += l.tokens;
    // Logits of example i inside the packed row equal its logits alone.
    int64_t offset = 0;
    for (size_t k = 0; k < i; ++k) offset += static_cast<int64_t>(ex[k].ids.size()) - 1;
    EXPECT_LT(test::max_abs_diff(lp_logits[0].narrow(0, offset, len), l_logits[0]), 1e-10) << "example " << i;
  }
  EXPECT_EQ(lp.tokens, n);
  EXPECT_EQ(lp.processed, 9);
  EXPECT_NEAR(lp.loss, sum / static_cast<double>(n), 1e-5);
  // Changing example 0's tokens does not touch example 1's logits.
  auto ex2 = ex;
  ex2[0].ids = {1, 30, 31, 32, 33};
  train::sft_loss(m, make_packed_batch(ex2, rows, 12), torch::kCPU, -1, &lp2_logits);
  EXPECT_LT(test::max_abs_diff(lp2_logits[0].narrow(0, 4, 5), lp_logits[0].narrow(0, 4, 5)), 1e-10);
}

TEST(Sft, PromptTokensGetNoGradientAndTheirLabelsDoNotMatter) {
  auto m = sft_model();
  std::vector<TokenizedExample> ex{example({1, 5, 6, 7, 8, 9}, {0, 0, 0, 1, 1, 1})};
  auto b = make_packed_batch(ex, {{0}}, 5);
  torch::Tensor logits;
  auto l = train::sft_loss(m, b, torch::kCPU, -1, &logits);
  logits.retain_grad();
  l.total.backward();
  auto g = logits.grad()[0];  // [T, V]
  // Targets 6 and 7 (positions 0, 1) are prompt: zero gradient; positions 2..4 are trained.
  EXPECT_EQ(g[0].abs().sum().item<double>(), 0.0);
  EXPECT_EQ(g[1].abs().sum().item<double>(), 0.0);
  EXPECT_GT(g[2].abs().sum().item<double>(), 0.0);
  auto b2 = b;
  b2.targets = b.targets.clone();
  b2.targets[0][0] = 33;
  b2.targets[0][1] = 34;
  EXPECT_EQ(train::sft_loss(m, b2, torch::kCPU).loss, l.loss);
}

TEST(Sft, LoadingCountsOverlongAndRejectsBadLines) {
  test::TempDir dir("sftdata");
  test::make_prepared(dir, 40);
  Tokenizer tok(dir / "tok/tokenizer.model");
  std::ofstream(dir / "ok.jsonl") << R"({"prompt": "The cat sees", "completion": " the moon."})" << "\n"
                                  << R"({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A dog likes the winter sky."}]})"
                                  << "\n" << R"({"text": "The old man paints the river."})" << "\n"
                                  << R"({"prompt": ")" << std::string(400, 'x') << R"(", "completion": "y"})" << "\n";
  SftOptions o;
  o.max_len = 64;
  SftStats st;
  auto ex = load_sft_examples(dir / "ok.jsonl", tok, o, &st);
  EXPECT_EQ(st.examples, 4);
  EXPECT_EQ(ex.size(), 3u);  // the 400-character prompt fills the limit: no target left, skipped
  EXPECT_EQ(st.skipped, 1);
  EXPECT_EQ(st.truncated, 1);
  std::ofstream(dir / "bad.jsonl") << R"({"prompt": "a", "completion": "b"})" << "\n{oops\n";
  try {
    load_sft_examples(dir / "bad.jsonl", tok, o, &st);
    FAIL();
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("bad.jsonl:2"), std::string::npos) << e.what();
  }
  std::ofstream(dir / "missing.jsonl") << R"({"prompt": "a"})" << "\n";
  EXPECT_THROW(load_sft_examples(dir / "missing.jsonl", tok, o, &st), UserError);
  std::ofstream(dir / "empty.jsonl") << R"({"prompt": "a", "completion": ""})" << "\n";
  EXPECT_THROW(load_sft_examples(dir / "empty.jsonl", tok, o, &st), UserError);
}
