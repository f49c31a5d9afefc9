#include "train/sft_objective.h"

#include <torch/torch.h>

#include "model/load_balance.h"

namespace moeforge::train {

BatchLoss sft_loss(MixtralForCausalLM& model, const data::PackedBatch& b, const torch::Device& device,
                   double aux_loss_coef, torch::Tensor* logits_out) {
  const auto& moe = model->config().moe;
  ForwardInputs in{b.inputs.to(device), b.position_ids.to(device), b.segment_ids.to(device)};
  ForwardOutput out = model->forward(in);
  const auto V = out.logits.size(-1);
  auto mask = b.loss_mask.to(device).reshape({-1});
  auto targets = b.targets.to(device).reshape({-1});
  auto flat = out.logits.reshape({-1, V});
  auto ce = torch::nn::functional::cross_entropy(flat.to(torch::kFloat), targets,
                                                 torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kNone));
  const auto n_targets = mask.sum();
  auto loss = (ce * mask).sum() / n_targets.clamp_min(1.0);
  std::vector<torch::Tensor> logits, idx;
  for (auto& r : out.router) {
    logits.push_back(r.logits_NE);
    idx.push_back(r.topk_idx_NK);
  }
  auto valid = b.valid.to(device).reshape({-1});
  const double coef = aux_loss_coef >= 0 ? aux_loss_coef : moe.aux_loss_coef;
  auto aux = load_balancing_loss(logits, idx, valid);
  auto z = router_z_loss(logits, valid);
  BatchLoss l;
  l.total = loss;
  if (moe.balance == Balance::AuxLoss && coef > 0) l.total = l.total + coef * aux;
  if (moe.z_loss_coef > 0) l.total = l.total + moe.z_loss_coef * z;
  // One host sync for the logged scalars and entropies, one for the loads.
  std::vector<torch::Tensor> scalars;
  {
    torch::NoGradGuard ng;
    auto correct = flat.argmax(-1).eq(targets).to(torch::kFloat);
    scalars = {loss.detach(), aux.detach(), z.detach(), (correct * mask).sum() / n_targets.clamp_min(1.0), n_targets,
               valid.sum()};
  }
  std::vector<torch::Tensor> loads;
  for (auto& r : out.router) {
    scalars.push_back(r.entropy);
    loads.push_back(r.tokens_per_expert);
  }
  auto s = torch::stack(scalars).to(torch::kDouble).cpu();
  auto loads_cpu = torch::stack(loads).cpu();
  const double* sv = s.data_ptr<double>();
  l.loss = sv[0];
  l.aux = sv[1];
  l.z = sv[2];
  l.accuracy = sv[3];
  l.tokens = static_cast<int64_t>(sv[4]);
  l.processed = static_cast<int64_t>(sv[5]);
  for (size_t i = 0; i < out.router.size(); ++i) {
    l.load_per_layer.push_back(loads_cpu[static_cast<int64_t>(i)]);
    l.entropy_per_layer.push_back(sv[6 + i]);
  }
  if (logits_out) *logits_out = out.logits;
  return l;
}

}  // namespace moeforge::train
