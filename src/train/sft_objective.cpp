#include "train/sft_objective.h"

#include <torch/torch.h>

#include "model/load_balance.h"

namespace moeforge::train {

SftLoss sft_loss(MixtralForCausalLM& model, const data::PackedBatch& b, const torch::Device& device,
                 double aux_loss_coef) {
  const auto& moe = model->config().moe;
  ForwardInputs in{b.inputs.to(device), b.position_ids.to(device), b.segment_ids.to(device)};
  ForwardOutput out = model->forward(in);
  const auto V = out.logits.size(-1);
  auto mask = b.loss_mask.to(device).reshape({-1});
  auto ce = torch::nn::functional::cross_entropy(
      out.logits.reshape({-1, V}).to(torch::kFloat), b.targets.to(device).reshape({-1}),
      torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kNone));
  const auto n_targets = mask.sum();
  SftLoss l;
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
  l.total = loss;
  if (moe.balance == Balance::AuxLoss && coef > 0) l.total = l.total + coef * aux;
  if (moe.z_loss_coef > 0) l.total = l.total + moe.z_loss_coef * z;
  {
    torch::NoGradGuard ng;
    auto correct = out.logits.reshape({-1, V}).argmax(-1).eq(b.targets.to(device).reshape({-1})).to(torch::kFloat);
    l.accuracy = ((correct * mask).sum() / n_targets.clamp_min(1.0)).item<double>();
  }
  l.loss = loss.item<double>();
  l.aux = aux.item<double>();
  l.z = z.item<double>();
  l.target_tokens = static_cast<int64_t>(n_targets.item<double>());
  l.logits = out.logits;
  for (auto& r : out.router) {
    l.load_per_layer.push_back(r.tokens_per_expert.cpu());
    l.entropy_per_layer.push_back(r.entropy.item<double>());
  }
  return l;
}

}  // namespace moeforge::train
