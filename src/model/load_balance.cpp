#include "model/load_balance.h"

#include <algorithm>

#include <ATen/ATen.h>

#include "core/error.h"

namespace moeforge {

namespace {
// Per-row weights [L*N] (1 = counts) and their sum, for pooled means.
at::Tensor pooled_mask(const at::Tensor& token_mask_N, int64_t L, int64_t N, const at::TensorOptions& opts) {
  if (!token_mask_N.defined()) return at::ones({L * N}, opts);
  MF_CHECK(token_mask_N.numel() == N, "token mask has one entry per token");
  return token_mask_N.reshape({-1}).to(opts).repeat({L});
}
}  // namespace

at::Tensor load_balancing_loss(const std::vector<at::Tensor>& logits_per_layer_NE,
                               const std::vector<at::Tensor>& topk_idx_per_layer_NK, const at::Tensor& token_mask_N) {
  MF_CHECK(!logits_per_layer_NE.empty(), "at least one layer");
  MF_CHECK(logits_per_layer_NE.size() == topk_idx_per_layer_NK.size(), "logits and choices per layer");
  const int64_t L = static_cast<int64_t>(logits_per_layer_NE.size());
  const int64_t N = logits_per_layer_NE[0].size(0);
  const int64_t E = logits_per_layer_NE[0].size(1);
  auto logits = at::cat(logits_per_layer_NE, 0);  // [L*N, E]
  auto idx = at::cat(topk_idx_per_layer_NK, 0);   // [L*N, K]
  auto probs = at::softmax(logits, -1);
  auto m = pooled_mask(token_mask_N, L, N, probs.options());  // [L*N]
  auto denom = m.sum().clamp_min(1.0);
  // f[j, e]: one-hot of the j-th choice, masked mean over rows.
  auto onehot = at::one_hot(idx, E).to(probs.scalar_type());           // [L*N, K, E]
  auto f = (onehot * m.view({-1, 1, 1})).sum(0) / denom;               // [K, E]
  auto P = (probs * m.view({-1, 1})).sum(0) / denom;                   // [E]
  return (f * P.unsqueeze(0)).sum() * static_cast<double>(E);
}

at::Tensor topk_counts(const std::vector<at::Tensor>& topk_idx_per_layer_NK, int64_t num_experts,
                       const at::Tensor& token_mask_N, double* rows) {
  MF_CHECK(!topk_idx_per_layer_NK.empty(), "at least one layer");
  const int64_t L = static_cast<int64_t>(topk_idx_per_layer_NK.size());
  const int64_t N = topk_idx_per_layer_NK[0].size(0);
  auto idx = at::cat(topk_idx_per_layer_NK, 0);  // [L*N, K]
  auto m = pooled_mask(token_mask_N, L, N, idx.options().dtype(at::kDouble));
  auto counts = (at::one_hot(idx, num_experts).to(at::kDouble) * m.view({-1, 1, 1})).sum(0);  // [K, E]
  auto both = at::cat({counts.reshape({-1}), m.sum().reshape({1})}).cpu();
  *rows = both[-1].item<double>();
  return both.narrow(0, 0, counts.numel()).view(counts.sizes()).clone();
}

at::Tensor global_balancing_share(const std::vector<at::Tensor>& logits_per_layer_NE, const at::Tensor& counts_KE,
                                  double rows, const at::Tensor& token_mask_N) {
  MF_CHECK(!logits_per_layer_NE.empty(), "at least one layer");
  const int64_t L = static_cast<int64_t>(logits_per_layer_NE.size());
  const int64_t N = logits_per_layer_NE[0].size(0);
  const int64_t E = logits_per_layer_NE[0].size(1);
  MF_CHECK(counts_KE.dim() == 2 && counts_KE.size(1) == E, "counts per (choice, expert)");
  auto probs = at::softmax(at::cat(logits_per_layer_NE, 0), -1);  // [L*N, E]
  auto m = pooled_mask(token_mask_N, L, N, probs.options());
  auto S = (probs * m.view({-1, 1})).sum(0);                      // [E]
  const double denom = std::max(rows, 1.0);
  auto f = (counts_KE / denom).to(probs.device(), probs.scalar_type());  // [K, E], no gradient
  return (f * S.unsqueeze(0)).sum() * (static_cast<double>(E) / denom);
}

at::Tensor sequence_balancing_loss(const std::vector<at::Tensor>& logits_per_layer_NE,
                                   const std::vector<at::Tensor>& topk_idx_per_layer_NK, int64_t seq_len,
                                   const at::Tensor& token_mask_N) {
  MF_CHECK(!logits_per_layer_NE.empty(), "at least one layer");
  MF_CHECK(logits_per_layer_NE.size() == topk_idx_per_layer_NK.size(), "logits and choices per layer");
  const int64_t L = static_cast<int64_t>(logits_per_layer_NE.size());
  const int64_t N = logits_per_layer_NE[0].size(0);
  const int64_t E = logits_per_layer_NE[0].size(1);
  const int64_t K = topk_idx_per_layer_NK[0].size(1);
  MF_CHECK(seq_len > 0 && N % seq_len == 0, "rows are whole sequences");
  const int64_t B = N / seq_len, T = seq_len;
  // [L, B, T, E] -> [B, L*T, E]: each sequence's rows of every layer together.
  auto probs = at::softmax(at::stack(logits_per_layer_NE, 0), -1).view({L, B, T, E}).permute({1, 0, 2, 3}).reshape({B, L * T, E});
  auto idx = at::stack(topk_idx_per_layer_NK, 0).view({L, B, T, K}).permute({1, 0, 2, 3}).reshape({B, L * T, K});
  at::Tensor m = token_mask_N.defined() ? token_mask_N.reshape({B, 1, T}).to(probs.options()).expand({B, L, T}).reshape({B, L * T})
                                        : at::ones({B, L * T}, probs.options());
  auto denom = m.sum(1);                                                           // [B]
  auto onehot = at::one_hot(idx, E).to(probs.scalar_type());                      // [B, L*T, K, E]
  auto f = (onehot * m.view({B, L * T, 1, 1})).sum(1) / denom.clamp_min(1.0).view({B, 1, 1});  // [B, K, E]
  auto P = (probs * m.view({B, L * T, 1})).sum(1) / denom.clamp_min(1.0).view({B, 1});        // [B, E]
  auto per_seq = (f * P.unsqueeze(1)).sum({1, 2}) * static_cast<double>(E);      // [B]
  auto has = denom.gt(0).to(per_seq.scalar_type());
  return (per_seq * has).sum() / has.sum().clamp_min(1.0);
}

at::Tensor router_z_loss(const std::vector<at::Tensor>& logits_per_layer_NE, const at::Tensor& token_mask_N) {
  MF_CHECK(!logits_per_layer_NE.empty(), "at least one layer");
  const int64_t L = static_cast<int64_t>(logits_per_layer_NE.size());
  const int64_t N = logits_per_layer_NE[0].size(0);
  auto logits = at::cat(logits_per_layer_NE, 0);
  auto z = at::logsumexp(logits, -1).pow(2);  // [L*N]
  auto m = pooled_mask(token_mask_N, L, N, z.options());
  return (z * m).sum() / m.sum().clamp_min(1.0);
}

double load_cv(const at::Tensor& load_E) {
  auto l = load_E.to(at::kDouble);
  double mean = l.mean().item<double>();
  if (mean == 0) return 0.0;
  return l.std(/*unbiased=*/false).item<double>() / mean;
}

BalanceStats balance_stats(const std::vector<int64_t>& load_E) {
  BalanceStats b;
  if (load_E.empty()) return b;
  auto t = at::tensor(load_E, at::kLong);
  const double mean = t.to(at::kDouble).mean().item<double>();
  if (mean > 0) b.max_over_mean = static_cast<double>(*std::max_element(load_E.begin(), load_E.end())) / mean;
  b.cv = load_cv(t);
  for (auto l : load_E)
    if (static_cast<double>(l) < 0.1 * mean) ++b.dead_experts;
  return b;
}

}  // namespace moeforge
