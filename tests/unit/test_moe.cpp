#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <numeric>

#include "model/decoder.h"
#include "model/moe_block.h"
#include "model/router.h"
#include "moe_block_util.h"
#include "test_util.h"

using namespace moeforge;
using test::max_abs_diff;
using test::make_moe_block;

namespace {

// Brute force: for each token, softmax over all logits, pick the k largest by a full sort,
// renormalise. (Equal to softmax over the k selected logits.)
void brute_force_route(const torch::Tensor& logits_NE, int64_t K, std::vector<std::vector<int64_t>>* idx,
                       std::vector<std::vector<double>>* w) {
  const auto N = logits_NE.size(0), E = logits_NE.size(1);
  auto acc = logits_NE.to(torch::kDouble).contiguous();
  for (int64_t n = 0; n < N; ++n) {
    std::vector<double> l(E);
    for (int64_t e = 0; e < E; ++e) l[e] = acc[n][e].item<double>();
    double mx = *std::max_element(l.begin(), l.end()), z = 0;
    std::vector<double> p(E);
    for (int64_t e = 0; e < E; ++e) z += (p[e] = std::exp(l[e] - mx));
    std::vector<int64_t> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return l[a] > l[b]; });
    std::vector<int64_t> ids(order.begin(), order.begin() + K);
    double s = 0;
    for (auto e : ids) s += p[e] / z;
    std::vector<double> ww;
    for (auto e : ids) ww.push_back(p[e] / z / s);
    idx->push_back(ids);
    w->push_back(ww);
  }
}

// The reference MoE: each token through its k experts in a plain loop.
torch::Tensor naive_moe(MoEBlockImpl& b, const torch::Tensor& x_NH, const RouterOutput& r) {
  std::vector<torch::Tensor> rows;
  for (int64_t n = 0; n < x_NH.size(0); ++n) {
    auto xn = x_NH[n].unsqueeze(0);
    torch::Tensor acc = torch::zeros_like(xn);
    for (int64_t j = 0; j < r.topk_idx_NK.size(1); ++j) {
      int64_t e = r.topk_idx_NK[n][j].item<int64_t>();
      auto& ex = b.experts->expert(e);
      auto h = ex->w2(torch::silu(ex->w1(xn)) * ex->w3(xn));
      acc = acc + r.topk_weight_NK[n][j].to(xn.scalar_type()) * h;
    }
    rows.push_back(acc);
  }
  return torch::cat(rows, 0);
}

// The block's forward and backward on x (dL/dy = upstream): its output, the input's and every parameter's
// gradient; the parameters' gradients are then cleared for a reference pass.
struct BlockRun {
  torch::Tensor y, upstream, gx;
  std::map<std::string, torch::Tensor> grads;
};
BlockRun run_block(MoEBlockImpl& b, const torch::Tensor& x) {
  BlockRun r;
  auto out = b.forward(x);
  r.y = out.y;
  r.upstream = torch::randn_like(out.y);
  (out.y * r.upstream).sum().backward();
  r.gx = x.grad().clone();
  for (auto& p : b.named_parameters())
    if (p.value().grad().defined()) r.grads[p.key()] = p.value().grad().clone();
  for (auto& p : b.parameters()) p.mutable_grad() = torch::Tensor();
  return r;
}

// A reference output built from x2 (a copy of the run's input, with its graph) against the run: the output, the
// input's gradient and every parameter's (the same parameters have one, and equal ones).
void expect_same_as_run(MoEBlockImpl& b, const BlockRun& run, const torch::Tensor& ref, const torch::Tensor& x2) {
  EXPECT_LT(max_abs_diff(run.y, ref), 1e-5);
  (ref * run.upstream).sum().backward();
  EXPECT_LT(max_abs_diff(run.gx, x2.grad()), 1e-5);
  for (auto& p : b.named_parameters()) {
    auto gr = p.value().grad();
    ASSERT_EQ(run.grads.count(p.key()), gr.defined() ? 1u : 0u) << p.key();
    if (gr.defined()) EXPECT_LT(max_abs_diff(run.grads.at(p.key()), gr), 1e-5) << p.key();
  }
}

}  // namespace

TEST(Router, WeightsMatchBruteForceTopK) {
  ModelConfig c = test::tiny_config();
  c.moe.num_experts = 6;
  c.moe.num_experts_per_tok = 3;
  Router r(c.hidden_size, c.moe);
  init_weights(*r, 0.5, 5);
  auto x = torch::randn({40, c.hidden_size});
  RouterOutput out = r->forward(x);
  EXPECT_EQ(out.logits_NE.scalar_type(), torch::kFloat);
  std::vector<std::vector<int64_t>> idx;
  std::vector<std::vector<double>> w;
  brute_force_route(out.logits_NE, 3, &idx, &w);
  // Dense [N, E] gate matrix: exactly k non-zeros per row, rows sum to 1.
  auto dense = torch::zeros({40, 6}).scatter(1, out.topk_idx_NK, out.topk_weight_NK);
  EXPECT_LT(max_abs_diff(dense.sum(1), torch::ones({40})), 1e-6);
  EXPECT_TRUE(torch::equal(dense.ne(0).sum(1), torch::full({40}, 3, torch::kLong)));
  for (int64_t n = 0; n < 40; ++n) {
    for (int64_t j = 0; j < 3; ++j) {
      int64_t e = idx[n][j];
      EXPECT_NEAR(dense[n][e].item<double>(), w[n][j], 1e-6) << "token " << n << " choice " << j;
    }
  }
  // Tokens per expert count every choice.
  EXPECT_EQ(out.tokens_per_expert.sum().item<int64_t>(), 40 * 3);
  EXPECT_TRUE(torch::equal(out.tokens_per_expert, torch::bincount(out.topk_idx_NK.reshape({-1}), {}, 6)));
}

TEST(Router, LogitsInFp32ForBf16Input) {
  ModelConfig c = test::tiny_config();
  Router r(c.hidden_size, c.moe);
  init_weights(*r, 0.5, 5);
  r->to(torch::kBFloat16);
  auto out = r->forward(torch::randn({5, c.hidden_size}).to(torch::kBFloat16));
  EXPECT_EQ(out.logits_NE.scalar_type(), torch::kFloat);
  EXPECT_EQ(out.topk_weight_NK.scalar_type(), torch::kFloat);
}

TEST(Router, AuxFreeBiasChangesSelectionOnly) {
  ModelConfig c = test::tiny_config();
  c.moe.balance = Balance::AuxFreeBias;
  Router r(c.hidden_size, c.moe);
  init_weights(*r, 0.5, 5);
  auto x = torch::randn({30, c.hidden_size});
  // A large bias on expert 3 makes every token pick it; gate weights still come from the raw logits.
  r->expert_bias.fill_(0);
  r->expert_bias[3] = 100.0;
  auto out = r->forward(x);
  EXPECT_TRUE(out.topk_idx_NK.eq(3).any(1).all().item<bool>());
  auto chosen = out.logits_NE.gather(1, out.topk_idx_NK);
  EXPECT_LT(max_abs_diff(out.topk_weight_NK, torch::softmax(chosen, -1)), 1e-6);
  // Update rule: +rate for under-loaded experts, -rate for over-loaded, then zero mean.
  r->expert_bias.zero_();
  r->update_expert_bias(torch::tensor({10, 0, 5, 5}, torch::kLong), 0.1);
  auto expected = torch::tensor({-0.1, 0.1, 0.0, 0.0}, torch::kFloat);
  expected -= expected.mean();
  EXPECT_LT(max_abs_diff(r->expert_bias, expected), 1e-7);
  EXPECT_NEAR(r->expert_bias.sum().item<double>(), 0.0, 1e-7);
  // Proportional: rate * (mean - load) / mean = 0.1 * (5 - {10, 0, 5, 5}) / 5, already centred; applied twice
  // from the state above, the sign step stays and the proportional one adds.
  r->update_expert_bias(torch::tensor({10, 0, 5, 5}, torch::kLong), 0.1, BiasUpdate::Proportional);
  auto prop = torch::tensor({-0.1, 0.1, 0.0, 0.0}, torch::kFloat);
  EXPECT_LT(max_abs_diff(r->expert_bias, expected + prop), 1e-7);
  r->expert_bias.zero_();
  r->update_expert_bias(torch::tensor({6, 2, 0, 0}, torch::kLong), 0.5, BiasUpdate::Proportional);
  // mean 2: 0.5 * (2 - {6, 2, 0, 0}) / 2 = {-1, 0, 0.5, 0.5}, mean 0 already.
  EXPECT_LT(max_abs_diff(r->expert_bias, torch::tensor({-1.0, 0.0, 0.5, 0.5}, torch::kFloat)), 1e-7);
  r->expert_bias.zero_();
  r->update_expert_bias(torch::tensor({6, 2, 0, 0}, torch::kLong), 0.5);  // sign: {-0.5, 0, 0.5, 0.5} - 0.125
  EXPECT_LT(max_abs_diff(r->expert_bias, torch::tensor({-0.625, -0.125, 0.375, 0.375}, torch::kFloat)), 1e-7);
}

TEST(MoEBlock, MatchesNaivePerTokenLoopForwardAndBackward) {
  auto b = make_moe_block(16, 24, 6, 2);
  auto x = torch::randn({3, 7, 16}, torch::requires_grad());
  const BlockRun run = run_block(*b, x);
  // Reference, with the same routing decision (gate weights keep their graph).
  auto x2 = x.detach().clone().requires_grad_(true);
  auto x2_NH = x2.reshape({-1, 16});
  RouterOutput r = b->gate->forward(x2_NH);
  expect_same_as_run(*b, run, naive_moe(*b, x2_NH, r).view(x2.sizes()), x2);
}

TEST(MoEBlock, ExpertsWithoutTokens) {
  auto b = make_moe_block(16, 24, 8, 2);
  // Force routing onto experts 1 and 6 only: the router weight favours them for every token.
  {
    torch::NoGradGuard ng;
    b->gate->weight.zero_();
    b->gate->weight[1].fill_(1.0);
    b->gate->weight[6].fill_(0.5);
  }
  auto x = (torch::rand({10, 16}) + 0.1).requires_grad_(true);  // positive inputs: 1 > 6 > others
  auto out = b->forward(x);
  auto counts = out.router.tokens_per_expert;
  EXPECT_EQ(counts[1].item<int64_t>(), 10);
  EXPECT_EQ(counts[6].item<int64_t>(), 10);
  EXPECT_EQ(counts.sum().item<int64_t>(), 20);
  auto ref = naive_moe(*b, x, out.router);
  EXPECT_LT(max_abs_diff(out.y, ref), 1e-5);
  out.y.sum().backward();
  EXPECT_FALSE(torch::isnan(x.grad()).any().item<bool>());
  EXPECT_FALSE(b->experts->expert(0)->w1->weight.grad().defined());  // never reached
  EXPECT_TRUE(b->experts->expert(1)->w1->weight.grad().defined());
}

TEST(MoEBlock, ZeroTokens) {
  auto b = make_moe_block(16, 24, 4, 2);
  auto x = torch::randn({0, 16}, torch::requires_grad());
  auto out = b->forward(x);
  EXPECT_EQ(out.y.size(0), 0);
  out.y.sum().backward();
  EXPECT_EQ(out.router.tokens_per_expert.sum().item<int64_t>(), 0);
}

TEST(MoEBlock, SortedDispatchGroupsByExpert) {
  LocalDispatcher d(4);
  auto idx = torch::tensor({2, 0, 1, 2, 0, 3}, torch::kLong).view({3, 2});
  auto x = torch::arange(3, torch::kFloat).view({3, 1}).expand({3, 2}).contiguous();
  auto counts = torch::bincount(idx.reshape({-1}), {}, 4);
  Dispatched g = d.dispatch(x, idx, counts);
  EXPECT_EQ(g.counts, (std::vector<int64_t>{2, 1, 2, 1}));
  // Expert 0 gets tokens 0 and 2, expert 1 token 1, expert 2 tokens 0 and 1, expert 3 token 2.
  auto tokens = g.x_grouped.select(1, 0);
  EXPECT_TRUE(torch::equal(tokens, torch::tensor({0.f, 2.f, 1.f, 0.f, 1.f, 2.f})));
  // Combine with weights undoes the grouping.
  auto w = torch::tensor({0.25f, 0.75f, 0.5f, 0.5f, 0.1f, 0.9f}).view({3, 2});
  auto y = d.combine(g.x_grouped, g, w);
  EXPECT_LT(max_abs_diff(y, x), 1e-6);
}

// Shared experts: S = 2 experts of width I beside the routed ones, held as one MLP of width 2I. The reference runs
// the two halves as separate experts (rows [0, I) and [I, 2I) of w1 and w3, the matching columns of w2) and adds
// them, scaled by sigmoid(g . x) when gated, to the routed output of the per-token loop: forward and every gradient.
TEST(MoEBlock, SharedExpertsAreTwoMlpsBesideTheRoutedOnes) {
  for (bool gated : {true, false}) {
    ModelConfig c = test::tiny_config();
    const int64_t H = 16, I = 12;
    c.hidden_size = H;
    c.intermediate_size = I;
    c.moe.num_experts = 5;
    c.moe.num_experts_per_tok = 2;
    c.moe.num_shared_experts = 2;
    c.moe.shared_expert_gate = gated;
    MoEBlock b(c);
    init_weights(*b, 0.3, 5);
    ASSERT_TRUE(b->shared_expert);
    EXPECT_EQ(b->shared_expert->w1->weight.sizes(), (std::vector<int64_t>{2 * I, H}));
    EXPECT_EQ(static_cast<bool>(b->shared_expert_gate), gated);
    auto x = torch::randn({2, 5, H}, torch::requires_grad());
    const BlockRun run = run_block(*b, x);
    auto x2 = x.detach().clone().requires_grad_(true);
    auto x2_NH = x2.reshape({-1, H});
    RouterOutput r = b->gate->forward(x2_NH);
    auto ref = naive_moe(*b, x2_NH, r);
    auto& se = b->shared_expert;
    torch::Tensor shared = torch::zeros_like(ref);
    for (int64_t s = 0; s < 2; ++s) {
      auto w1 = se->w1->weight.narrow(0, s * I, I), w3 = se->w3->weight.narrow(0, s * I, I);
      auto w2 = se->w2->weight.narrow(1, s * I, I);
      shared = shared + torch::matmul(torch::silu(torch::matmul(x2_NH, w1.t())) * torch::matmul(x2_NH, w3.t()), w2.t());
    }
    if (gated) shared = shared * torch::sigmoid(torch::matmul(x2_NH, b->shared_expert_gate->weight.t()));
    SCOPED_TRACE(gated ? "gated" : "ungated");
    expect_same_as_run(*b, run, (ref + shared).view(x2.sizes()), x2);
    EXPECT_TRUE(run.grads.count("shared_expert.w2.weight"));
    if (gated) EXPECT_TRUE(run.grads.count("shared_expert_gate.weight"));
  }
  // A dense config has no shared experts (it would be a wider MLP).
  ModelConfig d = test::tiny_config();
  d.moe.num_experts = 1;
  d.moe.num_experts_per_tok = 1;
  d.moe.num_shared_experts = 1;
  auto problem = model_config_problem(d);
  ASSERT_TRUE(problem);
  EXPECT_EQ(problem->key, "moe.num_shared_experts");
}
