#include <gtest/gtest.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <cmath>

#include "model/load_balance.h"
#include "test_util.h"

using namespace moeforge;

namespace {
torch::Tensor topk_of(const torch::Tensor& logits, int64_t k) { return std::get<1>(logits.topk(k, -1)); }
}  // namespace

// Uniform routing: logits all equal give p = 1/E; choices spread evenly over experts -> aux = k.
TEST(LoadBalance, UniformRoutingGivesK) {
  const int64_t E = 4, K = 2, N = 8;
  auto logits = torch::zeros({N, E});
  // Token n chooses experts (n % 4, (n + 1) % 4): every expert is a j-th choice exactly 2 times.
  auto idx = torch::empty({N, K}, torch::kLong);
  for (int64_t n = 0; n < N; ++n) {
    idx[n][0] = n % E;
    idx[n][1] = (n + 1) % E;
  }
  auto aux = load_balancing_loss({logits, logits}, {idx, idx});
  EXPECT_NEAR(aux.item<double>(), static_cast<double>(K), 1e-6);
}

// All tokens to one expert pair: by hand, with logits (a, b, c, c) for every token,
// p = softmax; first choice always 0, second always 1: f[0] = e_0, f[1] = e_1,
// aux = E * (P0 + P1) = E * (e^a + e^b) / (e^a + e^b + 2 e^c).
TEST(LoadBalance, CollapsedRoutingHandComputed) {
  const int64_t E = 4, K = 2, N = 5;
  const double a = 3.0, b = 1.0, c = -1.0;
  auto logits = torch::tensor({a, b, c, c}, torch::kFloat).view({1, E}).expand({N, E}).contiguous();
  auto idx = topk_of(logits, K);
  auto aux = load_balancing_loss({logits}, {idx});
  const double ea = std::exp(a), eb = std::exp(b), ec = std::exp(c);
  const double expected = E * (ea + eb) / (ea + eb + 2 * ec);
  EXPECT_NEAR(aux.item<double>(), expected, 1e-5);
  // All probability mass and every (k = 1) choice on expert 0: aux = E * f[0] * P[0] = E * 1 * 1 = 4.
  auto peaked = torch::tensor({50.0f, 0.f, 0.f, 0.f}).view({1, E}).expand({N, E}).contiguous();
  auto aux1 = load_balancing_loss({peaked}, {topk_of(peaked, 1)});
  EXPECT_NEAR(aux1.item<double>(), 4.0, 1e-5);
}

TEST(LoadBalance, PooledOverLayers) {
  // Layer means pooled over (layer, token) rows: two layers of N tokens equal one layer of 2N tokens.
  auto l1 = torch::randn({6, 5}), l2 = torch::randn({6, 5});
  auto i1 = topk_of(l1, 2), i2 = topk_of(l2, 2);
  auto pooled = load_balancing_loss({l1, l2}, {i1, i2});
  auto joint = load_balancing_loss({torch::cat({l1, l2})}, {torch::cat({i1, i2})});
  EXPECT_NEAR(pooled.item<double>(), joint.item<double>(), 1e-6);
}

TEST(LoadBalance, PaddingDoesNotCount) {
  auto logits = torch::randn({10, 4});
  auto idx = topk_of(logits, 2);
  auto mask = torch::tensor({1, 1, 1, 1, 1, 1, 0, 0, 0, 0}, torch::kBool);
  auto masked = load_balancing_loss({logits}, {idx}, mask);
  auto first6 = load_balancing_loss({logits.narrow(0, 0, 6)}, {idx.narrow(0, 0, 6)});
  EXPECT_NEAR(masked.item<double>(), first6.item<double>(), 1e-6);
  // Changing padded rows changes nothing.
  auto logits2 = logits.clone();
  logits2.narrow(0, 6, 4).normal_(0, 10);
  auto idx2 = topk_of(logits2, 2);
  EXPECT_NEAR(load_balancing_loss({logits2}, {idx2}, mask).item<double>(), masked.item<double>(), 1e-6);
  // Two layers with a mask: the mask is applied to each layer.
  auto l2 = torch::randn({10, 4});
  auto two = load_balancing_loss({logits, l2}, {idx, topk_of(l2, 2)}, mask);
  auto two_ref = load_balancing_loss({logits.narrow(0, 0, 6), l2.narrow(0, 0, 6)},
                                     {idx.narrow(0, 0, 6), topk_of(l2, 2).narrow(0, 0, 6)});
  EXPECT_NEAR(two.item<double>(), two_ref.item<double>(), 1e-6);
}

TEST(ZLoss, HandComputedAndMasked) {
  // logits (0, 0) -> logsumexp = ln 2; (ln 3, 0) -> ln 4.
  auto logits = torch::tensor({0.0, 0.0, std::log(3.0), 0.0, 100.0, 0.0}, torch::kDouble).view({3, 2});
  auto mask = torch::tensor({1, 1, 0}, torch::kBool);
  const double l2 = std::log(2.0), l4 = std::log(4.0);
  EXPECT_NEAR(router_z_loss({logits}, mask).item<double>(), (l2 * l2 + l4 * l4) / 2, 1e-12);
  // Two layers pooled: the mean over all (layer, token) rows.
  auto other = torch::zeros({3, 2}, torch::kDouble);
  EXPECT_NEAR(router_z_loss({logits, other}, mask).item<double>(), (l2 * l2 + l4 * l4 + 2 * l2 * l2) / 4, 1e-12);
}

// The gradient reaches the logits through P only (f counts choices): by hand, for token n,
// d aux / d logit[n, e] = (E / N) * p[n, e] * (c[e] - sum_e' p[n, e'] c[e']), c[e] = sum_j f[j, e].
TEST(LoadBalance, GradientFlowsToLogits) {
  const int64_t N = 8, E = 4, K = 2;
  // A seeded draw (the global generator made this test depend on what ran before it): with 8 tokens the top-2
  // counts can come out perfectly balanced, where the gradient is zero; this draw is not (checked below).
  auto gen = at::detail::createCPUGenerator(11);
  auto logits = torch::randn({N, E}, gen, torch::kDouble).requires_grad_(true);
  auto idx = topk_of(logits.detach(), K);
  auto aux = load_balancing_loss({logits}, {idx});
  aux.backward();
  auto p = torch::softmax(logits.detach(), -1);
  auto pa = p.accessor<double, 2>();
  auto ia = idx.accessor<int64_t, 2>();
  std::vector<double> c(E, 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < K; ++j) c[static_cast<size_t>(ia[n][j])] += 1.0 / N;
  auto g = logits.grad().accessor<double, 2>();
  double total = 0;
  for (int64_t n = 0; n < N; ++n) {
    double pc = 0;
    for (int64_t e = 0; e < E; ++e) pc += pa[n][e] * c[static_cast<size_t>(e)];
    for (int64_t e = 0; e < E; ++e) {
      const double want = static_cast<double>(E) / N * pa[n][e] * (c[static_cast<size_t>(e)] - pc);
      EXPECT_NEAR(g[n][e], want, 1e-12) << n << "," << e;
      total += std::abs(want);
    }
  }
  EXPECT_GT(total, 1e-3);  // not a vacuous zero gradient
}

TEST(LoadBalance, BalanceStatsByHand) {
  // Loads (10, 2, 0, 4): mean 4, max/mean 2.5, population std sqrt((36 + 4 + 16 + 0) / 4) = sqrt(14),
  // dead: under 0.4 -> one expert.
  const BalanceStats b = balance_stats({10, 2, 0, 4});
  EXPECT_DOUBLE_EQ(b.max_over_mean, 2.5);
  EXPECT_NEAR(b.cv, std::sqrt(14.0) / 4.0, 1e-12);
  EXPECT_EQ(b.dead_experts, 1);
  const BalanceStats even = balance_stats({3, 3, 3});
  EXPECT_DOUBLE_EQ(even.max_over_mean, 1.0);
  EXPECT_DOUBLE_EQ(even.cv, 0.0);
  EXPECT_EQ(even.dead_experts, 0);
  const BalanceStats none = balance_stats({0, 0});  // no tokens: nothing is meaningful, nothing divides by 0
  EXPECT_DOUBLE_EQ(none.max_over_mean, 0.0);
  EXPECT_DOUBLE_EQ(none.cv, 0.0);
}

TEST(LoadBalance, LoadCv) {
  EXPECT_DOUBLE_EQ(load_cv(torch::tensor({5, 5, 5, 5})), 0.0);
  // load (2, 0): mean 1, population std 1 -> cv 1.
  EXPECT_NEAR(load_cv(torch::tensor({2, 0})), 1.0, 1e-12);
}

// The sequence-wise loss by hand: 2 sequences of 2 tokens, E = 2, k = 1, one layer, logits (a, 0) for every token.
// Sequence 0 routes its tokens to experts 0 and 1 (balanced within it): f = (1/2, 1/2), P = (s, 1 - s) with
// s = sigmoid(a), loss E * (s + 1 - s) / 2 = 1. Sequence 1 sends both to expert 0: f = (1, 0), loss E * s = 2s.
// The mean: (1 + 2s) / 2. The batch form sees f = (3/4, 1/4) over all four: E * (3s/4 + (1 - s)/4) = (1 + 2s) / 2
// too here, so a second case where they differ: sequence 0 all to expert 0, sequence 1 all to expert 1: the batch
// form is balanced, E * (s/2 + (1 - s)/2) = 1; the sequence-wise mean is (2s + 2(1 - s)) / 2 = 1 ... with
// P per sequence: both sequences have P = (s, 1 - s); sequence 0: E * 1 * s = 2s, sequence 1: E * (1 - s); mean
// (2s + 2 - 2s) / 2 = 1. With per-sequence logits that differ (sequence 1: (0, a)), sequence 1's P = (1 - s, s) and
// its loss E * s: the mean is 2s, while the batch form (P = (1/2, 1/2)) stays 1. Balance across sequences is not
// balance within them.
TEST(LoadBalance, SequenceWiseByHand) {
  const double a = 1.3, s = 1.0 / (1.0 + std::exp(-a));
  auto row = [](double x, double y) { return torch::tensor({x, y}, torch::kDouble).view({1, 2}); };
  auto idx = [](std::vector<int64_t> v) { return torch::tensor(v, torch::kLong).view({-1, 1}); };
  auto same = torch::cat({row(a, 0), row(a, 0), row(a, 0), row(a, 0)});
  EXPECT_NEAR(sequence_balancing_loss({same}, {idx({0, 1, 0, 0})}, 2).item<double>(), (1 + 2 * s) / 2, 1e-12);
  auto split = torch::cat({row(a, 0), row(a, 0), row(0, a), row(0, a)});
  const auto choice = idx({0, 0, 1, 1});
  EXPECT_NEAR(sequence_balancing_loss({split}, {choice}, 2).item<double>(), 2 * s, 1e-12);
  EXPECT_NEAR(load_balancing_loss({split}, {choice}).item<double>(), 1.0, 1e-12);
  // One sequence of four: the batch form exactly.
  EXPECT_NEAR(sequence_balancing_loss({split}, {choice}, 4).item<double>(), 1.0, 1e-12);
  // Padding: sequence 1's second token masked out, and a sequence wholly padded does not count.
  auto mask = torch::tensor({1, 1, 1, 0}, torch::kDouble);
  EXPECT_NEAR(sequence_balancing_loss({split}, {choice}, 2, mask).item<double>(), 2 * s, 1e-12);
  auto none = torch::tensor({1, 1, 0, 0}, torch::kDouble);
  EXPECT_NEAR(sequence_balancing_loss({split}, {choice}, 2, none).item<double>(), 2 * s, 1e-12);
}

// Against an independent reference: the batch form over each sequence's rows (every layer's) alone, averaged;
// and its gradient against central finite differences in fp64.
TEST(LoadBalance, SequenceWiseIsTheBatchFormPerSequenceWithItsGradient) {
  at::Generator gen = at::detail::createCPUGenerator(21);
  const int64_t B = 3, T = 5, E = 6, K = 2;
  std::vector<torch::Tensor> logits, idx;
  for (int l = 0; l < 2; ++l) {
    logits.push_back(torch::randn({B * T, E}, gen, torch::kDouble).requires_grad_(true));
    idx.push_back(topk_of(logits.back().detach(), K));
  }
  auto loss = sequence_balancing_loss(logits, idx, T);
  double ref = 0;
  for (int64_t b = 0; b < B; ++b) {
    std::vector<torch::Tensor> lb, ib;
    for (int l = 0; l < 2; ++l) {
      lb.push_back(logits[l].detach().narrow(0, b * T, T));
      ib.push_back(idx[l].narrow(0, b * T, T));
    }
    ref += load_balancing_loss(lb, ib).item<double>() / B;
  }
  EXPECT_NEAR(loss.item<double>(), ref, 1e-12);
  loss.backward();
  const double h = 1e-6;
  for (int l = 0; l < 2; ++l)
    for (int64_t i : {0L, 7L, 14L}) {
      for (int64_t e : {0L, 3L}) {
        auto bump = [&](double d) {
          std::vector<torch::Tensor> x;
          for (int m = 0; m < 2; ++m) x.push_back(logits[m].detach().clone());
          x[l][i][e] += d;
          return sequence_balancing_loss(x, idx, T).item<double>();
        };
        const double fd = (bump(h) - bump(-h)) / (2 * h);
        EXPECT_NEAR(logits[l].grad()[i][e].item<double>(), fd, 1e-7) << l << " " << i << " " << e;
        EXPECT_GT(std::abs(fd), 1e-6) << "a gradient that could be zero proves nothing";
      }
    }
}

// topk_counts by hand: two layers, three tokens (the last padding), K = 2 of E = 3.
TEST(LoadBalance, TopkCountsByHand) {
  auto l0 = torch::tensor({0, 1, 2, 0, 1, 1}, torch::kLong).view({3, 2});
  auto l1 = torch::tensor({1, 0, 2, 1, 0, 0}, torch::kLong).view({3, 2});
  double rows = 0;
  auto c = topk_counts({l0, l1}, 3, torch::tensor({1, 1, 0}, torch::kLong), &rows);
  EXPECT_EQ(rows, 4.0);
  // first choices of real rows: 0, 2 (layer 0), 1, 2 (layer 1); second: 1, 0, 0, 1.
  auto want = torch::tensor({1.0, 1.0, 2.0, 2.0, 2.0, 0.0}, torch::kDouble).view({2, 3});
  EXPECT_TRUE(torch::equal(c, want)) << c;
  auto all = topk_counts({l0, l1}, 3, {}, &rows);
  EXPECT_EQ(rows, 6.0);
  EXPECT_EQ(all.sum().item<double>(), 12.0);
}

// The global-batch form: three micro-batches of different sizes (one with padding), two layers. The shares,
// with the step's counts, add up to the batch loss over the three at once (the independent reference: the
// micro-batches concatenated), and so do their gradients with respect to every micro-batch's logits. The
// micro-batch form (the mean of each micro-batch's own loss) differs on the same data.
TEST(LoadBalance, GlobalBatchSharesAddUpToTheWholeBatch) {
  const int64_t E = 4, K = 2, L = 2;
  const std::vector<int64_t> sizes{3, 5, 2};
  auto gen = at::detail::createCPUGenerator(17);
  std::vector<std::vector<torch::Tensor>> logits(sizes.size()), idx(sizes.size());
  std::vector<torch::Tensor> masks;
  for (size_t m = 0; m < sizes.size(); ++m) {
    for (int64_t l = 0; l < L; ++l) {
      // micro-batch m leans towards expert m: the fractions differ between micro-batches
      auto x = at::randn({sizes[m], E}, gen, torch::kDouble);
      x.select(1, static_cast<int64_t>(m)) += 1.5;
      logits[m].push_back(x.requires_grad_());
      idx[m].push_back(topk_of(x.detach(), K));
    }
    auto mask = torch::ones({sizes[m]}, torch::kLong);
    if (m == 1) mask[4] = 0;
    masks.push_back(mask);
  }
  // Counting pass, then each micro-batch's share.
  torch::Tensor counts;
  double rows = 0;
  for (size_t m = 0; m < sizes.size(); ++m) {
    double r = 0;
    auto c = topk_counts(idx[m], E, masks[m], &r);
    counts = counts.defined() ? counts + c : c;
    rows += r;
  }
  EXPECT_EQ(rows, 2.0 * (3 + 4 + 2));
  torch::Tensor shares = torch::zeros({}, torch::kDouble);
  for (size_t m = 0; m < sizes.size(); ++m) shares = shares + global_balancing_share(logits[m], counts, rows, masks[m]);
  // Reference: every layer's rows of the three micro-batches concatenated, one batch loss.
  std::vector<torch::Tensor> cat_logits, cat_idx;
  for (int64_t l = 0; l < L; ++l) {
    std::vector<torch::Tensor> a, b;
    for (size_t m = 0; m < sizes.size(); ++m) {
      a.push_back(logits[m][static_cast<size_t>(l)]);
      b.push_back(idx[m][static_cast<size_t>(l)]);
    }
    cat_logits.push_back(torch::cat(a));
    cat_idx.push_back(torch::cat(b));
  }
  auto whole = load_balancing_loss(cat_logits, cat_idx, torch::cat(masks));
  EXPECT_NEAR(shares.item<double>(), whole.item<double>(), 1e-12);
  std::vector<torch::Tensor> leaves;
  for (auto& v : logits)
    for (auto& t : v) leaves.push_back(t);
  auto g_shares = torch::autograd::grad({shares}, leaves);
  auto g_whole = torch::autograd::grad({whole}, leaves);
  for (size_t i = 0; i < leaves.size(); ++i) {
    EXPECT_LE((g_shares[i] - g_whole[i]).abs().max().item<double>(), 1e-12) << i;
    EXPECT_GT(g_whole[i].abs().max().item<double>(), 1e-3) << i;  // a real gradient
  }
  EXPECT_EQ(g_shares[3][4].abs().max().item<double>(), 0.0);  // the padded row of micro-batch 1, layer 1
  double per_micro = 0;
  for (size_t m = 0; m < sizes.size(); ++m) per_micro += load_balancing_loss(logits[m], idx[m], masks[m]).item<double>();
  EXPECT_GT(std::abs(per_micro / 3 - whole.item<double>()), 1e-2);
}
