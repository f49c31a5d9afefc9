// Preference pairs: loading (shapes, masks, bad input counted), completion log-probs of packed sequences
// against a sequence-by-sequence reference, and the DPO batch plumbing.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <fstream>

#include "core/error.h"
#include "corpus.h"
#include "data/preference.h"
#include "model/decoder.h"
#include "test_util.h"
#include "objective/dpo_objective.h"

using namespace moeforge;
using namespace moeforge::data;

TEST(Preference, LoadsBothShapesWithTheMaskOnTheCompletionOnly) {
  test::TempDir dir("prefload");
  test::make_prepared(dir, 40);
  Tokenizer tok(dir / "tok/tokenizer.model");
  std::ofstream(dir / "p.jsonl")
      << R"({"prompt": "The cat sees", "chosen": "the moon.", "rejected": "a dog."})" << "\n"
      << R"({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], )"
      << R"("chosen": [{"role": "assistant", "content": "The old man."}], "rejected": [{"role": "assistant", "content": "A river."}]})"
      << "\n";
  PreferenceStats st;
  auto pairs = load_preference_pairs(dir / "p.jsonl", tok, 64, &st);
  ASSERT_EQ(pairs.size(), 2u);
  EXPECT_EQ(st.pairs_read, 2);
  EXPECT_EQ(st.skips.total(), 0);
  // Pair 0: the prompt's tokens are those of the prompt alone, the mask covers exactly the completion + </s>.
  auto prompt = tokenize_chat(tok, {Message{"user", "The cat sees"}}, false, "x");
  auto chosen = tokenize_chat(tok, {Message{"user", "The cat sees"}, Message{"assistant", "the moon."}}, false, "x");
  EXPECT_EQ(pairs[0].chosen.ids, chosen.ids);
  const size_t p = prompt.ids.size();
  for (size_t i = 0; i < chosen.ids.size(); ++i) EXPECT_EQ(pairs[0].chosen.loss_mask[i], i >= p ? 1 : 0) << i;
  EXPECT_EQ(pairs[0].chosen.ids.back(), tok.eos_id());
  EXPECT_EQ(std::vector<int>(pairs[0].rejected.ids.begin(), pairs[0].rejected.ids.begin() + static_cast<long>(p)),
            prompt.ids);
  // Pair 1: message lists with a system message; the completion mask starts after [/INST].
  auto prompt1 = tokenize_chat(tok, {Message{"system", "Be brief."}, Message{"user", "Hi"}}, false, "x");
  int64_t masked = 0;
  for (size_t i = 0; i < prompt1.ids.size(); ++i) masked += pairs[1].rejected.loss_mask[i];
  EXPECT_EQ(masked, 0);
  EXPECT_EQ(pairs[1].rejected.loss_mask.back(), 1);
  // A completion of several messages: the user turn inside it is not a target.
  std::ofstream(dir / "multi.jsonl")
      << R"({"prompt": "Hi", "chosen": [{"role": "assistant", "content": "The cat."}, {"role": "user", "content": "More"},)"
      << R"( {"role": "assistant", "content": "A dog."}], "rejected": "No."})" << "\n";
  auto multi = load_preference_pairs(dir / "multi.jsonl", tok, 64, &st);
  ASSERT_EQ(multi.size(), 1u);
  auto full = tokenize_chat(tok, {Message{"user", "Hi"}, Message{"assistant", "The cat."}, Message{"user", "More"},
                                  Message{"assistant", "A dog."}}, false, "x");
  auto hi = tokenize_chat(tok, {Message{"user", "Hi"}}, false, "x");
  EXPECT_EQ(multi[0].chosen.ids, full.ids);
  for (size_t i = 0; i < full.ids.size(); ++i)  // the chat mask (assistant turns) minus the prompt
    EXPECT_EQ(multi[0].chosen.loss_mask[i], i < hi.ids.size() ? 0 : full.loss_mask[i]) << i;
  int64_t inner_user = 0;
  for (size_t i = hi.ids.size(); i < full.ids.size(); ++i) inner_user += full.loss_mask[i] == 0;
  EXPECT_GT(inner_user, 0);  // "[INST] More [/INST]" stays masked
}

TEST(Preference, BadInputIsCountedOrNamedNeverACrash) {
  test::TempDir dir("prefbad");
  test::make_prepared(dir, 40);
  Tokenizer tok(dir / "tok/tokenizer.model");
  std::ofstream(dir / "p.jsonl") << R"({"prompt": "a", "chosen": "b", "rejected": "c"})" << "\n"
                                 << R"({"prompt": "a", "chosen": "b"})" << "\n"                       // missing field
                                 << R"({"prompt": "a", "chosen": "", "rejected": "c"})" << "\n"      // empty completion
                                 << R"({"prompt": ")" << std::string(300, 'x') << R"(", "chosen": "b", "rejected": "c"})"
                                 << "\n"                                                                // prompt too long
                                 << R"({"prompt": "a", "chosen": ")" << std::string(300, 'y')
                                 << R"(", "rejected": "c"})" << "\n"                                  // truncated
                                 << "\n";                                                               // blank: ignored
  PreferenceStats st;
  auto pairs = load_preference_pairs(dir / "p.jsonl", tok, 32, &st);
  EXPECT_EQ(pairs.size(), 2u);
  EXPECT_EQ(st.pairs_read, 5);
  EXPECT_EQ(st.truncated, 1);
  EXPECT_EQ(st.skips.by_reason["missing field"], 1);
  EXPECT_EQ(st.skips.by_reason["empty completion"], 1);
  EXPECT_EQ(st.skips.by_reason["prompt over the limit"], 1);
  EXPECT_NE(st.skips.first.find("p.jsonl:2"), std::string::npos) << st.skips.first;
  EXPECT_EQ(pairs[1].chosen.ids.size(), 33u);  // cut to seq_len + 1
  // A line that is not JSON names file:line; a wrong type or role order too.
  auto expect_error = [&](const std::string& content, const std::string& needle) {
    std::ofstream(dir / "e.jsonl") << R"({"prompt": "a", "chosen": "b", "rejected": "c"})" << "\n" << content << "\n";
    try {
      load_preference_pairs(dir / "e.jsonl", tok, 32, &st);
      ADD_FAILURE() << "no error for " << content;
    } catch (const UserError& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_error("{oops", "e.jsonl:2: invalid JSON");
  expect_error(R"({"prompt": 3, "chosen": "b", "rejected": "c"})", "e.jsonl:2: field 'prompt'");
  expect_error(R"({"prompt": "a", "chosen": [{"role": "user", "content": "b"}], "rejected": "c"})", "e.jsonl:2");
  expect_error(R"({"prompt": [], "chosen": "b", "rejected": "c"})", "e.jsonl:2: field 'prompt' must end with a user");
  expect_error(R"({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "b", "rejected": "c"})",
               "e.jsonl:2: field 'prompt' must end with a user");
  expect_error(R"([1, 2])", "e.jsonl:2: expected a JSON object");
  // Nothing usable: an error that says why.
  std::ofstream(dir / "none.jsonl") << R"({"prompt": "a", "chosen": "", "rejected": "c"})" << "\n";
  try {
    load_preference_pairs(dir / "none.jsonl", tok, 32, &st);
    ADD_FAILURE();
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("1 empty completion"), std::string::npos) << e.what();
  }
}

namespace {
TokenizedExample example(std::vector<int> ids, std::vector<uint8_t> mask) { return TokenizedExample{ids, mask}; }

// Sum of log p(ids[t] | ids[<t]) over masked t, the sequence alone in a batch, in fp64 from the logits.
double naive_logp(MixtralForCausalLM& m, const TokenizedExample& e) {
  torch::NoGradGuard ng;
  std::vector<int64_t> ids(e.ids.begin(), e.ids.end());
  auto x = torch::tensor(ids, torch::kLong).unsqueeze(0);
  auto logits = m->forward(ForwardInputs{x}).logits[0].to(torch::kDouble);
  double s = 0;
  for (size_t t = 1; t < e.ids.size(); ++t) {
    if (!e.loss_mask[t]) continue;
    auto row = logits[static_cast<int64_t>(t - 1)];
    s += (row[e.ids[t]] - row.logsumexp(0)).item<double>();
  }
  return s;
}
}  // namespace

// Packed completion log-probs equal each sequence's own, computed alone with a naive loop.
TEST(Preference, PackedSequenceLogpsEqualEachSequenceAlone) {
  ModelConfig c = test::tiny_config();
  MixtralForCausalLM m(c);
  init_weights(*m, 0.2, 3);
  m->eval();
  std::vector<TokenizedExample> seqs{example({1, 5, 6, 7, 8, 2}, {0, 0, 0, 1, 1, 1}), example({1, 9, 10, 2}, {0, 0, 1, 1}),
                                     example({1, 11, 12, 13, 14, 15, 2}, {0, 0, 0, 0, 1, 1, 1}),
                                     example({1, 16, 2}, {0, 1, 1})};
  std::vector<const TokenizedExample*> ptr;
  for (auto& s : seqs) ptr.push_back(&s);
  torch::NoGradGuard ng;
  auto lp = train::sequence_logps(m, ptr, 10, torch::kCPU);  // 5 + 3 | 6 + 2: two rows
  ASSERT_EQ(lp.logps.size(0), 4);
  for (size_t i = 0; i < seqs.size(); ++i) {
    EXPECT_NEAR(lp.logps[static_cast<int64_t>(i)].item<double>(), naive_logp(m, seqs[i]), 1e-4) << i;
    int64_t n = 0;
    for (size_t t = 1; t < seqs[i].loss_mask.size(); ++t) n += seqs[i].loss_mask[t];
    EXPECT_EQ(lp.tokens[static_cast<int64_t>(i)].item<double>(), n);
  }
}

// The DPO batch with the policy as its own reference: loss log 2, every reward 0; a step of gradient
// descent on it raises the chosen completion's log-prob relative to the rejected one.
TEST(Preference, DpoBatchAgainstItselfIsLog2AndLearns) {
  ModelConfig c = test::tiny_config();
  c.moe.aux_loss_coef = 0.0;
  c.moe.z_loss_coef = 0.0;
  MixtralForCausalLM m(c);
  init_weights(*m, 0.2, 4);
  std::vector<PreferencePair> pairs{{example({1, 5, 6, 20, 2}, {0, 0, 0, 1, 1}), example({1, 5, 6, 21, 2}, {0, 0, 0, 1, 1})},
                                    {example({1, 7, 22, 23, 2}, {0, 0, 1, 1, 1}), example({1, 7, 24, 2}, {0, 0, 1, 1})}};
  std::vector<size_t> idx{0, 1};
  auto [rc, rr] = train::reference_logps(m, pairs, idx, 2, 16, torch::kCPU);
  train::DpoOptions o;
  auto b = train::dpo_batch(m, pairs, idx, rc, rr, o, 16, torch::kCPU);
  EXPECT_NEAR(b.loss, std::log(2.0), 1e-6);
  EXPECT_NEAR(b.metrics["rewards/chosen"], 0.0, 1e-6);
  EXPECT_NEAR(b.metrics["rewards/margins"], 0.0, 1e-6);
  EXPECT_NEAR(b.metrics["logps/chosen"], (rc.sum() / 2).item<double>(), 1e-5);
  EXPECT_EQ(b.tokens, 2 + 3 + 2 + 2);
  b.total.backward();
  {
    torch::NoGradGuard ng;
    for (auto& p : m->parameters())
      if (p.grad().defined()) p.sub_(1.0 * p.grad());
  }
  auto after = train::dpo_batch(m, pairs, idx, rc, rr, o, 16, torch::kCPU);
  EXPECT_LT(after.loss, b.loss);
  EXPECT_GT(after.metrics["rewards/margins"], 0.0);
}

// dpo_batch against a shifted reference: each loss type, label smoothing and the RPO term equal their
// formulas on log-probs computed sequence by sequence with the naive loop.
TEST(Preference, DpoBatchEqualsTheFormulasOnNaiveLogps) {
  ModelConfig c = test::tiny_config();
  c.moe.aux_loss_coef = 0.0;
  c.moe.z_loss_coef = 0.0;
  MixtralForCausalLM m(c);
  init_weights(*m, 0.2, 5);
  m->eval();
  std::vector<PreferencePair> pairs{{example({1, 5, 6, 20, 2}, {0, 0, 0, 1, 1}), example({1, 5, 6, 21, 22, 2}, {0, 0, 0, 1, 1, 1})},
                                    {example({1, 7, 22, 23, 2}, {0, 0, 1, 1, 1}), example({1, 7, 24, 2}, {0, 0, 1, 1})}};
  std::vector<size_t> idx{0, 1};
  const double pc[2] = {naive_logp(m, pairs[0].chosen), naive_logp(m, pairs[1].chosen)};
  const double pr[2] = {naive_logp(m, pairs[0].rejected), naive_logp(m, pairs[1].rejected)};
  const double nc[2] = {2, 3}, nr[2] = {3, 2};  // completion tokens
  auto rc = torch::tensor({pc[0] - 0.3, pc[1] + 0.2}, torch::kFloat), rr = torch::tensor({pr[0] + 0.1, pr[1] - 0.4}, torch::kFloat);
  const double rcv[2] = {pc[0] - 0.3, pc[1] + 0.2}, rrv[2] = {pr[0] + 0.1, pr[1] - 0.4};
  auto ls = [](double x) { return -std::log1p(std::exp(-x)); };
  const double beta = 0.5, eps = 0.2, alpha = 0.7;
  for (const char* type : {"sigmoid", "robust", "hinge", "ipo"}) {
    train::DpoOptions o;
    o.beta = beta;
    o.loss = type;
    o.label_smoothing = std::string(type) == "hinge" || std::string(type) == "ipo" ? 0.0 : eps;
    o.rpo_alpha = alpha;
    torch::NoGradGuard ng;
    auto b = train::dpo_batch(m, pairs, idx, rc, rr, o, 16, torch::kCPU);
    double want = 0, margin = 0;
    for (int i = 0; i < 2; ++i) {
      const bool ipo = std::string(type) == "ipo";
      const double x = ipo ? (pc[i] / nc[i] - pr[i] / nr[i]) - (rcv[i] / nc[i] - rrv[i] / nr[i])
                           : (pc[i] - pr[i]) - (rcv[i] - rrv[i]);
      const double s = o.label_smoothing;
      double l = 0;
      if (std::string(type) == "sigmoid") l = -(1 - s) * ls(beta * x) - s * ls(-beta * x);
      if (std::string(type) == "robust") l = ((1 - s) * -ls(beta * x) + s * ls(-beta * x)) / (1 - 2 * s);
      if (std::string(type) == "hinge") l = std::max(0.0, 1 - beta * x);
      if (ipo) l = (x - 1 / (2 * beta)) * (x - 1 / (2 * beta));
      want += l / 2;
      margin += (ipo ? beta * ((pc[i] - rcv[i]) / nc[i] - (pr[i] - rrv[i]) / nr[i])
                     : beta * ((pc[i] - rcv[i]) - (pr[i] - rrv[i]))) / 2;
    }
    const double nll = -(pc[0] + pc[1]) / (nc[0] + nc[1]);
    EXPECT_NEAR(b.loss, want, 1e-4) << type;
    EXPECT_NEAR(b.metrics["rewards/margins"], margin, 1e-4) << type;
    EXPECT_NEAR(b.metrics["nll_loss"], nll, 1e-4) << type;
    EXPECT_NEAR(b.total.item<double>(), want + alpha * nll, 1e-4) << type;
  }
}
