#include "optim/optimizer.h"

#include <torch/torch.h>

#include <cmath>

#include "core/error.h"

namespace moeforge::train {

bool decays(const std::string& name, const torch::Tensor& p) {
  return p.dim() >= 2 && name.find("norm") == std::string::npos;
}

AdamW::AdamW(const std::vector<std::pair<std::string, torch::Tensor>>& named_params, AdamWOptions opt,
             std::vector<bool> owned)
    : opt_(opt), owned_(std::move(owned)) {
  if (owned_.empty()) owned_.assign(named_params.size(), true);
  MF_CHECK(owned_.size() == named_params.size(), "one ownership flag per parameter");
  for (const auto& [name, p] : named_params) {
    const bool mine = owned_[names_.size()];
    names_.push_back(name);
    params_.push_back(p);
    exp_avg_.push_back(mine ? torch::zeros_like(p, torch::TensorOptions().dtype(torch::kFloat)) : torch::Tensor());
    exp_avg_sq_.push_back(mine ? torch::zeros_like(p, torch::TensorOptions().dtype(torch::kFloat)) : torch::Tensor());
    steps_.push_back(0);
    decay_.push_back(decays(name, p));
  }
}

void AdamW::step(double lr) {
  torch::NoGradGuard ng;
  for (size_t i = 0; i < params_.size(); ++i) {
    auto& p = params_[i];
    const auto& g0 = p.grad();
    if (!g0.defined() || !owned_[i]) continue;
    auto g = g0.to(torch::kFloat);
    const int64_t t = ++steps_[i];
    exp_avg_[i].mul_(opt_.beta1).add_(g, 1.0 - opt_.beta1);
    exp_avg_sq_[i].mul_(opt_.beta2).addcmul_(g, g, 1.0 - opt_.beta2);
    const double bc1 = 1.0 - std::pow(opt_.beta1, static_cast<double>(t));
    const double bc2 = 1.0 - std::pow(opt_.beta2, static_cast<double>(t));
    auto denom = (exp_avg_sq_[i] / bc2).sqrt_().add_(opt_.eps);
    auto update = exp_avg_[i] / denom * (lr / bc1);
    if (p.scalar_type() == torch::kFloat) {
      if (decay_[i] && opt_.weight_decay > 0) p.mul_(1.0 - lr * opt_.weight_decay);
      p.sub_(update);
    } else {
      auto pf = p.to(torch::kFloat);
      if (decay_[i] && opt_.weight_decay > 0) pf.mul_(1.0 - lr * opt_.weight_decay);
      pf.sub_(update);
      p.copy_(pf);
    }
  }
}

void AdamW::zero_grad() {
  for (auto& p : params_) p.mutable_grad() = torch::Tensor();
}

std::vector<std::pair<std::string, torch::Tensor>> AdamW::state() const {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (size_t i = 0; i < params_.size(); ++i) {
    if (!owned_[i]) continue;
    out.emplace_back("exp_avg." + names_[i], exp_avg_[i].to(torch::kCPU));
    out.emplace_back("exp_avg_sq." + names_[i], exp_avg_sq_[i].to(torch::kCPU));
    out.emplace_back("step." + names_[i], torch::tensor({steps_[i]}, torch::kLong));
  }
  return out;
}

void AdamW::load_state(const std::map<std::string, torch::Tensor>& s, const std::string& source) {
  torch::NoGradGuard ng;
  auto get = [&](const std::string& key, const torch::Tensor& like) {
    auto it = s.find(key);
    if (it == s.end()) throw UserError(source + ": optimizer state '" + key + "' is missing");
    if (like.defined() && it->second.sizes() != like.sizes())
      throw UserError(source + ": optimizer state '" + key + "' has the wrong shape");
    return it->second;
  };
  for (size_t i = 0; i < params_.size(); ++i) {
    if (!owned_[i]) continue;
    exp_avg_[i].copy_(get("exp_avg." + names_[i], exp_avg_[i]));
    exp_avg_sq_[i].copy_(get("exp_avg_sq." + names_[i], exp_avg_sq_[i]));
    steps_[i] = get("step." + names_[i], {}).item<int64_t>();
  }
}

int64_t AdamW::state_bytes() const {
  int64_t b = 0;
  for (size_t i = 0; i < params_.size(); ++i)
    if (owned_[i]) b += (exp_avg_[i].numel() + exp_avg_sq_[i].numel()) * 4 + 8;
  return b;
}

}  // namespace moeforge::train
