#include "train/lm_objective.h"

#include <torch/torch.h>

#include "model/load_balance.h"

namespace moeforge::train {

BatchLoss lm_loss(MixtralForCausalLM& model, const data::LmBatch& batch, const torch::Device& device) {
  const auto& moe = model->config().moe;
  auto inputs = batch.inputs.to(device);
  auto targets = batch.targets.to(device);
  ForwardOutput out = model->forward(inputs);
  const auto V = out.logits.size(-1);
  auto ce = torch::nn::functional::cross_entropy(out.logits.reshape({-1, V}).to(torch::kFloat), targets.reshape({-1}));
  std::vector<torch::Tensor> logits, idx;
  for (auto& r : out.router) {
    logits.push_back(r.logits_NE);
    idx.push_back(r.topk_idx_NK);
  }
  BatchLoss l;
  l.total = ce;
  const bool use_aux = moe.balance == Balance::AuxLoss && moe.aux_loss_coef > 0;
  const bool use_z = moe.z_loss_coef > 0;
  torch::Tensor aux, z;
  if (use_aux) {
    aux = load_balancing_loss(logits, idx);
    l.total = l.total + moe.aux_loss_coef * aux;
  } else {
    torch::NoGradGuard ng;
    aux = load_balancing_loss(logits, idx);
  }
  if (use_z) {
    z = router_z_loss(logits);
    l.total = l.total + moe.z_loss_coef * z;
  } else {
    torch::NoGradGuard ng;
    z = router_z_loss(logits);
  }
  // Two host syncs for everything logged: the scalars and entropies, then the loads.
  std::vector<torch::Tensor> scalars{ce.detach().to(torch::kDouble), aux.detach().to(torch::kDouble),
                                     z.detach().to(torch::kDouble)};
  std::vector<torch::Tensor> loads;
  for (auto& r : out.router) {
    scalars.push_back(r.entropy.to(torch::kDouble));
    loads.push_back(r.tokens_per_expert);
  }
  auto s = torch::stack(scalars).cpu();
  auto loads_cpu = torch::stack(loads).cpu();
  const double* sv = s.data_ptr<double>();
  l.loss = sv[0];
  l.aux = sv[1];
  l.z = sv[2];
  l.tokens = targets.numel();
  l.processed = l.tokens;
  for (size_t i = 0; i < out.router.size(); ++i) {
    l.load_per_layer.push_back(loads_cpu[static_cast<int64_t>(i)]);
    l.entropy_per_layer.push_back(sv[3 + i]);
  }
  return l;
}

}  // namespace moeforge::train
