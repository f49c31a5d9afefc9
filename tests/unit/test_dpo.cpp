#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>

#include "core/error.h"
#include "objective/dpo_loss.h"

using namespace moeforge::train;

namespace {
double log_sigmoid(double x) { return -std::log1p(std::exp(-x)); }
torch::Tensor t(std::vector<double> v) { return torch::tensor(v, torch::kDouble); }
}  // namespace

// Hand-computed: two pairs with policy/reference log-probs chosen so that logits = (-1 - -3) - (-2 - -2.5) = 1.5
// and (-4 - -1) - (-3 - -2) = -2.
TEST(Dpo, LossesEqualTheirFormulasByHand) {
  auto pc = t({-1.0, -4.0}), pr = t({-3.0, -1.0}), rc = t({-2.0, -3.0}), rr = t({-2.5, -2.0});
  const double beta = 0.1;
  const double l1 = 1.5, l2 = -2.0;
  auto mean2 = [](double a, double b) { return (a + b) / 2; };
  EXPECT_NEAR(dpo_loss(pc, pr, rc, rr, beta, "sigmoid").loss.item<double>(),
              mean2(-log_sigmoid(beta * l1), -log_sigmoid(beta * l2)), 1e-12);
  const double ls = 0.1;
  auto cdpo = [&](double l) { return -(1 - ls) * log_sigmoid(beta * l) - ls * log_sigmoid(-beta * l); };
  EXPECT_NEAR(dpo_loss(pc, pr, rc, rr, beta, "sigmoid", ls).loss.item<double>(), mean2(cdpo(l1), cdpo(l2)), 1e-12);
  auto robust = [&](double l) { return ((1 - ls) * -log_sigmoid(beta * l) + ls * log_sigmoid(-beta * l)) / (1 - 2 * ls); };
  EXPECT_NEAR(dpo_loss(pc, pr, rc, rr, beta, "robust", ls).loss.item<double>(), mean2(robust(l1), robust(l2)), 1e-12);
  EXPECT_NEAR(dpo_loss(pc, pr, rc, rr, beta, "hinge").loss.item<double>(),
              mean2(std::max(0.0, 1 - beta * l1), std::max(0.0, 1 - beta * l2)), 1e-12);
  EXPECT_NEAR(dpo_loss(pc, pr, rc, rr, beta, "ipo").loss.item<double>(),
              mean2(std::pow(l1 - 1 / (2 * beta), 2), std::pow(l2 - 1 / (2 * beta), 2)), 1e-12);
  auto o = dpo_loss(pc, pr, rc, rr, beta, "sigmoid");
  // rewards: chosen beta*(pc - rc) = (0.1, -0.1); rejected beta*(pr - rr) = (-0.05, 0.1).
  EXPECT_NEAR(o.chosen_rewards[0].item<double>(), 0.1, 1e-12);
  EXPECT_NEAR(o.rejected_rewards[1].item<double>(), 0.1, 1e-12);
  EXPECT_DOUBLE_EQ(o.accuracy, 0.5);
  EXPECT_NEAR(o.margin, mean2(0.1 - -0.05, -0.1 - 0.1), 1e-12);
  EXPECT_THROW(dpo_loss(pc, pr, rc, rr, beta, "kto"), moeforge::UserError);
}

TEST(Dpo, PolicyEqualToReferenceGivesLog2AndZeroRewards) {
  auto c = t({-3.0, -7.5, -1.25}), r = t({-2.0, -9.0, -4.0});
  auto o = dpo_loss(c, r, c, r, 0.5, "sigmoid");
  EXPECT_NEAR(o.loss.item<double>(), std::log(2.0), 1e-12);
  EXPECT_EQ(o.chosen_rewards.abs().max().item<double>(), 0.0);
  EXPECT_EQ(o.rejected_rewards.abs().max().item<double>(), 0.0);
  EXPECT_DOUBLE_EQ(o.accuracy, 0.0);  // ties are not wins
}

TEST(Dpo, GradientPushesChosenUpAndRejectedDown) {
  auto pc = t({-2.0}).requires_grad_(true), pr = t({-2.0}).requires_grad_(true);
  auto o = dpo_loss(pc, pr, t({-2.0}), t({-2.0}), 0.1, "sigmoid");
  o.loss.backward();
  EXPECT_LT(pc.grad().item<double>(), 0.0);  // descending the loss raises log p(chosen)
  EXPECT_GT(pr.grad().item<double>(), 0.0);
  EXPECT_NEAR(pc.grad().item<double>(), -0.1 * 0.5, 1e-12);  // -beta * sigmoid(0)
}
