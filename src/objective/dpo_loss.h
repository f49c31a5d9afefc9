// Direct Preference Optimization losses over summed completion log-probs (TRL's names and formulas).
//   logits = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)
//   sigmoid: -(1 - ls) * log s(beta * logits) - ls * log s(-beta * logits)      (ls: label smoothing, cDPO)
//   robust:  ((1 - ls) * -log s(beta * logits) + ls * log s(-beta * logits)) / (1 - 2 ls)
//   hinge:   relu(1 - beta * logits)
//   ipo:     (logits - 1 / (2 beta))^2, on length-normalised log-probs (the caller averages them)
// Rewards: chosen = beta * (pi_chosen - ref_chosen), rejected = beta * (pi_rejected - ref_rejected).
#pragma once
#include <torch/types.h>

#include <string>

namespace moeforge::train {

struct DpoOutput {
  torch::Tensor loss;  // mean over pairs
  torch::Tensor chosen_rewards, rejected_rewards;  // [N], detached
  double accuracy = 0, margin = 0;                 // rewards/accuracies, rewards/margins (means)
};

DpoOutput dpo_loss(const torch::Tensor& policy_chosen, const torch::Tensor& policy_rejected,
                   const torch::Tensor& ref_chosen, const torch::Tensor& ref_rejected, double beta,
                   const std::string& type, double label_smoothing = 0.0);

}  // namespace moeforge::train
