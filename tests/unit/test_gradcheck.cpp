// Analytic gradients of a tiny model in double precision against central finite differences.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "model/decoder.h"
#include "model/load_balance.h"
#include "test_util.h"

using namespace moeforge;

namespace {

// Loss = cross-entropy + aux + z, so every path (attention, experts, router, balancing) is checked.
torch::Tensor loss_of(MixtralForCausalLM& m, const torch::Tensor& ids, const torch::Tensor& targets) {
  auto out = m->forward(ids);
  auto ce = torch::nn::functional::cross_entropy(out.logits.reshape({-1, out.logits.size(-1)}), targets.reshape({-1}));
  std::vector<torch::Tensor> logits, idx;
  for (auto& r : out.router) {
    logits.push_back(r.logits_NE);
    idx.push_back(r.topk_idx_NK);
  }
  return ce + 0.1 * load_balancing_loss(logits, idx) + 0.01 * router_z_loss(logits);
}

// Sum of routing decisions, to make sure a finite-difference step did not flip a top-k choice.
torch::Tensor routing_of(MixtralForCausalLM& m, const torch::Tensor& ids) {
  auto out = m->forward(ids);
  std::vector<torch::Tensor> idx;
  for (auto& r : out.router) idx.push_back(r.topk_idx_NK);
  return torch::stack(idx);
}

}  // namespace

TEST(GradCheck, TinyModelMatchesFiniteDifferences) {
  ModelConfig c = test::tiny_config();
  c.vocab_size = 16;
  c.hidden_size = 8;
  c.intermediate_size = 12;
  c.num_layers = 2;
  c.num_attention_heads = 2;
  c.num_key_value_heads = 1;
  c.sliding_window = 3;
  c.moe.num_experts = 4;
  c.moe.num_experts_per_tok = 2;
  MixtralForCausalLM m(c);
  init_weights(*m, 0.5, 21);
  m->to(torch::kDouble);
  auto gen_ids = torch::randint(0, c.vocab_size, {2, 5}, torch::kLong);
  auto targets = torch::randint(0, c.vocab_size, {2, 5}, torch::kLong);
  auto routing = routing_of(m, gen_ids);

  auto loss = loss_of(m, gen_ids, targets);
  loss.backward();

  const double eps = 1e-6;
  int checked = 0, skipped = 0;
  torch::manual_seed(3);
  for (auto& p : m->named_parameters()) {
    auto& w = p.value();
    auto g = w.grad();
    // A few entries of every parameter tensor (experts without tokens have no gradient: must be 0 by FD too).
    for (int rep = 0; rep < 3; ++rep) {
      int64_t i = torch::randint(0, w.numel(), {1}, torch::kLong).item<int64_t>();
      auto flat = w.view({-1});
      double orig = flat[i].item<double>();
      double num;
      {
        torch::NoGradGuard ng;
        flat[i] = orig + eps;
        bool same1 = torch::equal(routing_of(m, gen_ids), routing);
        double lp = loss_of(m, gen_ids, targets).item<double>();
        flat[i] = orig - eps;
        bool same2 = torch::equal(routing_of(m, gen_ids), routing);
        double lm = loss_of(m, gen_ids, targets).item<double>();
        flat[i] = orig;
        if (!same1 || !same2) {
          ++skipped;  // a top-k flip: the loss is not differentiable across it
          continue;
        }
        num = (lp - lm) / (2 * eps);
      }
      double ana = g.defined() ? g.view({-1})[i].item<double>() : 0.0;
      EXPECT_NEAR(ana, num, 1e-6 + 1e-5 * std::abs(num)) << p.key() << "[" << i << "]";
      ++checked;
    }
  }
  EXPECT_GT(checked, 40);
  EXPECT_LE(skipped, 3);
}
