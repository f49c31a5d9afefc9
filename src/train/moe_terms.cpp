#include "train/moe_terms.h"

#include <torch/torch.h>

#include "model/load_balance.h"

namespace moeforge::train {

MoeTerms add_moe_terms(torch::Tensor& total, const std::vector<RouterOutput>& router, const MoEConfig& moe,
                       double aux_coef, int64_t seq_len, const torch::Tensor& valid_N) {
  std::vector<torch::Tensor> logits, idx;
  for (const auto& r : router) {
    logits.push_back(r.logits_NE);
    idx.push_back(r.topk_idx_NK);
  }
  const double coef = aux_coef >= 0 ? aux_coef : moe.aux_loss_coef;
  const bool use_aux = moe.balance == Balance::AuxLoss && coef > 0;
  const bool use_z = moe.z_loss_coef > 0;
  MoeTerms t;
  {
    torch::NoGradGuard ng;  // a term outside the objective is logged only: no graph for it
    if (!use_aux) t.aux = load_balancing_loss(logits, idx, valid_N);
    if (!use_z) t.z = router_z_loss(logits, valid_N);
  }
  if (use_aux) {
    t.aux = load_balancing_loss(logits, idx, valid_N);
    total = total + coef * t.aux;
  }
  if (moe.seq_aux_loss_coef > 0) {
    t.seq = sequence_balancing_loss(logits, idx, seq_len, valid_N);
    total = total + moe.seq_aux_loss_coef * t.seq;
  }
  if (use_z) {
    t.z = router_z_loss(logits, valid_N);
    total = total + moe.z_loss_coef * t.z;
  }
  return t;
}

std::vector<double> fetch_logged(BatchLoss& l, const std::vector<torch::Tensor>& scalars,
                                 const std::vector<RouterOutput>& router) {
  std::vector<torch::Tensor> all, loads;
  for (const auto& s : scalars) all.push_back(s.detach().to(torch::kDouble));
  for (const auto& r : router) {
    all.push_back(r.entropy.to(torch::kDouble));
    loads.push_back(r.tokens_per_expert);
  }
  auto s = torch::stack(all).cpu();
  auto loads_cpu = torch::stack(loads).cpu();
  const double* sv = s.data_ptr<double>();
  const size_t n = scalars.size();
  for (size_t i = 0; i < router.size(); ++i) {
    l.load_per_layer.push_back(loads_cpu[static_cast<int64_t>(i)]);
    l.entropy_per_layer.push_back(sv[n + i]);
  }
  return std::vector<double>(sv, sv + n);
}

}  // namespace moeforge::train
