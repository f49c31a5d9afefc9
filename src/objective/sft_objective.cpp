#include "objective/sft_objective.h"

#include <torch/torch.h>

#include "objective/moe_terms.h"

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
  auto valid = b.valid.to(device).reshape({-1});
  BatchLoss l;
  l.total = loss;
  const MoeTerms t = add_moe_terms(l.total, out.router, moe, aux_loss_coef, in.input_ids.size(1), valid);
  std::vector<torch::Tensor> scalars{loss, t.aux, t.z};
  {
    torch::NoGradGuard ng;
    auto correct = flat.argmax(-1).eq(targets).to(torch::kFloat);
    scalars.push_back((correct * mask).sum() / n_targets.clamp_min(1.0));
    scalars.push_back(n_targets);
    scalars.push_back(valid.sum());
  }
  const auto v = fetch_logged(l, scalars, out.router);
  l.loss = v[0];
  l.aux = v[1];
  l.z = v[2];
  l.accuracy = v[3];
  l.tokens = static_cast<int64_t>(v[4]);
  l.processed = static_cast<int64_t>(v[5]);
  if (logits_out) *logits_out = out.logits;
  return l;
}

}  // namespace moeforge::train
