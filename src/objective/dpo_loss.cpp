#include "objective/dpo_loss.h"

#include <torch/torch.h>

#include "core/error.h"

namespace moeforge::train {

DpoOutput dpo_loss(const torch::Tensor& pc, const torch::Tensor& pr, const torch::Tensor& rc, const torch::Tensor& rr,
                   double beta, const std::string& type, double ls) {
  if (!(beta > 0)) throw UserError("dpo: beta must be positive");
  if (ls < 0 || ls >= 0.5) throw UserError("dpo: label_smoothing must be in [0, 0.5)");
  auto logits = (pc - pr) - (rc - rr);
  torch::Tensor losses;
  if (type == "sigmoid") {
    losses = -(1 - ls) * torch::log_sigmoid(beta * logits) - ls * torch::log_sigmoid(-beta * logits);
  } else if (type == "robust") {
    losses = ((1 - ls) * -torch::log_sigmoid(beta * logits) + ls * torch::log_sigmoid(-beta * logits)) / (1 - 2 * ls);
  } else if (type == "hinge") {
    losses = torch::relu(1 - beta * logits);
  } else if (type == "ipo") {
    losses = (logits - 1 / (2 * beta)).pow(2);
  } else {
    throw UserError("dpo: loss_type must be sigmoid, ipo, hinge or robust, got '" + type + "'");
  }
  DpoOutput o;
  o.loss = losses.mean();
  o.chosen_rewards = (beta * (pc - rc)).detach();
  o.rejected_rewards = (beta * (pr - rr)).detach();
  o.accuracy = o.chosen_rewards.gt(o.rejected_rewards).to(torch::kDouble).mean().item<double>();
  o.margin = (o.chosen_rewards - o.rejected_rewards).to(torch::kDouble).mean().item<double>();
  return o;
}

}  // namespace moeforge::train
