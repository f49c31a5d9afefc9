#include "objective/moe_terms.h"

#include <torch/torch.h>

#include "core/error.h"
#include "model/load_balance.h"

namespace moeforge::train {

namespace {
thread_local GlobalBalance* g_global_balance = nullptr;

void add_counts(GlobalBalance& g, const std::vector<torch::Tensor>& idx, int64_t E, const torch::Tensor& valid_N) {
  double rows = 0;
  auto c = topk_counts(idx, E, valid_N, &rows);
  g.counts = g.counts.defined() ? g.counts + c : c;
  g.rows += rows;
}

// The step's counts and rows summed over the ranks (one transfer).
void reduce_counts(GlobalBalance& g) {
  std::vector<torch::Tensor> v{torch::cat({g.counts.reshape({-1}), torch::tensor({g.rows}, torch::kDouble)})};
  g.all_reduce_sum(v);
  auto t = v[0].cpu();
  g.rows = t[-1].item<double>();
  g.counts = t.narrow(0, 0, g.counts.numel()).view(g.counts.sizes()).clone();
}
}  // namespace

GlobalBalanceScope::GlobalBalanceScope(GlobalBalance& g) : prev_(g_global_balance) { g_global_balance = &g; }
GlobalBalanceScope::~GlobalBalanceScope() { g_global_balance = prev_; }

void finish_counting(GlobalBalance& g) {
  MF_CHECK(g.phase == GlobalBalance::Phase::Count && g.counts.defined(), "a counted step");
  reduce_counts(g);
  g.phase = GlobalBalance::Phase::Apply;
}

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
  GlobalBalance* g = use_aux ? g_global_balance : nullptr;
  if (g && g->phase == GlobalBalance::Phase::Count) {
    add_counts(*g, idx, moe.num_experts, valid_N);  // a forward without gradient: the loss is not used
    t.aux = load_balancing_loss(logits, idx, valid_N);
  } else if (g) {
    if (g->phase == GlobalBalance::Phase::ReduceAndApply) {
      g->counts = torch::Tensor();
      g->rows = 0;
      add_counts(*g, idx, moe.num_experts, valid_N);
      reduce_counts(*g);
    }
    t.aux = g->parts * global_balancing_share(logits, g->counts, g->rows, valid_N);
    total = total + coef * t.aux;
  } else if (use_aux) {
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
