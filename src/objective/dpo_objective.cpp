#include "objective/dpo_objective.h"

#include <torch/torch.h>

#include <cmath>

#include "data/sft_dataset.h"
#include "objective/moe_terms.h"
#include "objective/dpo_loss.h"

namespace moeforge::train {

SequenceLogps sequence_logps(MixtralForCausalLM& model, const std::vector<const data::TokenizedExample*>& seqs,
                             int64_t seq_len, const torch::Device& device) {
  std::vector<data::TokenizedExample> ex;
  ex.reserve(seqs.size());
  for (const auto* s : seqs) ex.push_back(*s);
  const auto rows = data::pack_rows(ex, seq_len);
  const data::PackedBatch b = data::make_packed_batch(ex, rows, seq_len);
  // Which sequence each (input, target) position belongs to, in the packing's order.
  auto seq_of = torch::zeros({static_cast<int64_t>(rows.size()), seq_len}, torch::kLong);
  auto so = seq_of.accessor<int64_t, 2>();
  for (size_t r = 0; r < rows.size(); ++r) {
    int64_t col = 0;
    for (size_t i : rows[r])
      for (size_t t = 0; t + 1 < ex[i].ids.size(); ++t) so[static_cast<int64_t>(r)][col++] = static_cast<int64_t>(i);
  }
  SequenceLogps s;
  s.out = model->forward(ForwardInputs{b.inputs.to(device), b.position_ids.to(device), b.segment_ids.to(device)});
  const auto V = s.out.logits.size(-1);
  auto logp = torch::log_softmax(s.out.logits.reshape({-1, V}).to(torch::kFloat), -1)
                  .gather(1, b.targets.to(device).reshape({-1, 1}))
                  .squeeze(1);
  auto mask = b.loss_mask.to(device).reshape({-1});
  auto idx = seq_of.to(device).reshape({-1});
  const auto S = static_cast<int64_t>(seqs.size());
  auto zeros = torch::zeros({S}, logp.options());
  s.logps = zeros.index_add(0, idx, logp * mask);
  s.tokens = zeros.detach().index_add(0, idx, mask);
  s.valid = b.valid.to(device).reshape({-1});
  return s;
}

std::pair<torch::Tensor, torch::Tensor> reference_logps(MixtralForCausalLM& model,
                                                        const std::vector<data::PreferencePair>& pairs,
                                                        const std::vector<size_t>& idx, int64_t batch, int64_t seq_len,
                                                        const torch::Device& device) {
  torch::NoGradGuard ng;
  EvalModeGuard em(model);
  std::vector<torch::Tensor> chosen, rejected;
  for (size_t a = 0; a < idx.size(); a += static_cast<size_t>(batch)) {
    const size_t e = std::min(idx.size(), a + static_cast<size_t>(batch));
    std::vector<const data::TokenizedExample*> seqs;
    for (size_t k = a; k < e; ++k) seqs.push_back(&pairs[idx[k]].chosen);
    for (size_t k = a; k < e; ++k) seqs.push_back(&pairs[idx[k]].rejected);
    auto lp = sequence_logps(model, seqs, seq_len, device).logps.cpu();
    const auto n = static_cast<int64_t>(e - a);
    chosen.push_back(lp.slice(0, 0, n));
    rejected.push_back(lp.slice(0, n, 2 * n));
  }
  return {torch::cat(chosen), torch::cat(rejected)};
}

BatchLoss dpo_batch(MixtralForCausalLM& model, const std::vector<data::PreferencePair>& pairs,
                    const std::vector<size_t>& idx, const torch::Tensor& ref_chosen, const torch::Tensor& ref_rejected,
                    const DpoOptions& opt, int64_t seq_len, const torch::Device& device) {
  const auto& moe = model->config().moe;
  const auto n = static_cast<int64_t>(idx.size());
  std::vector<const data::TokenizedExample*> seqs;
  for (size_t i : idx) seqs.push_back(&pairs[i].chosen);
  for (size_t i : idx) seqs.push_back(&pairs[i].rejected);
  SequenceLogps s = sequence_logps(model, seqs, seq_len, device);
  auto pc = s.logps.slice(0, 0, n), pr = s.logps.slice(0, n, 2 * n);
  auto rc = ref_chosen.to(device), rr = ref_rejected.to(device);
  DpoOutput d;
  if (opt.loss == "ipo") {  // IPO compares mean log-probs per completion token
    auto nc = s.tokens.slice(0, 0, n).clamp_min(1.0), nr = s.tokens.slice(0, n, 2 * n).clamp_min(1.0);
    d = dpo_loss(pc / nc, pr / nr, rc / nc, rr / nr, opt.beta, opt.loss, opt.label_smoothing);
  } else {
    d = dpo_loss(pc, pr, rc, rr, opt.beta, opt.loss, opt.label_smoothing);
  }
  auto tc = s.tokens.slice(0, 0, n);
  auto nll = -pc.sum() / tc.sum().clamp_min(1.0);
  BatchLoss o;
  o.total = d.loss;
  if (opt.rpo_alpha > 0) o.total = o.total + opt.rpo_alpha * nll;
  const MoeTerms t = add_moe_terms(o.total, s.out.router, moe, opt.aux_loss_coef, s.out.logits.size(1), s.valid);
  // One host transfer for every logged number (and one for the loads).
  const auto st = fetch_logged(o, {d.loss, t.aux, t.z, d.chosen_rewards.mean(), d.rejected_rewards.mean(),
                                   pc.mean(), pr.mean(), s.tokens.sum(), s.valid.sum(), nll},
                               s.out.router);
  o.loss = st[0];
  o.aux = st[1];
  o.z = st[2];
  o.tokens = static_cast<int64_t>(st[7]);
  o.processed = static_cast<int64_t>(st[8]);
  o.accuracy = d.accuracy;
  o.metrics = {{"rewards/chosen", st[3]},  {"rewards/rejected", st[4]}, {"rewards/accuracies", d.accuracy},
               {"rewards/margins", d.margin}, {"logps/chosen", st[5]}, {"logps/rejected", st[6]}, {"nll_loss", st[9]}};
  return o;
}

EvalResult evaluate_pairs(MixtralForCausalLM& model, const std::vector<data::PreferencePair>& pairs, size_t n,
                          int64_t batch,
                          const std::function<std::pair<torch::Tensor, torch::Tensor>(const std::vector<size_t>&)>& ref,
                          const DpoOptions& opt, int64_t seq_len, const torch::Device& device) {
  torch::NoGradGuard ng;
  EvalModeGuard em(model);
  EvalResult r;
  double loss = 0;
  for (size_t a = 0; a < n; a += static_cast<size_t>(batch)) {
    std::vector<size_t> idx;
    for (size_t k = a; k < std::min(n, a + static_cast<size_t>(batch)); ++k) idx.push_back(k);
    auto [rc, rr] = ref(idx);
    BatchLoss l = dpo_batch(model, pairs, idx, rc, rr, opt, seq_len, device);
    const double w = static_cast<double>(idx.size());
    loss += l.loss * w;
    for (const auto& [k, v] : l.metrics) r.metrics[k] += v * w;
    r.tokens += l.tokens;
  }
  r.loss = loss / static_cast<double>(n);
  r.perplexity = NAN;  // a DPO loss is not a likelihood
  for (auto& [k, v] : r.metrics) v /= static_cast<double>(n);
  return r;
}

}  // namespace moeforge::train
