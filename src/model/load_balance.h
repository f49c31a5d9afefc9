// Balancing terms of the MoE objective, pooled over all layers.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace moeforge {

// Switch / HF `load_balancing_loss_func`: logits of all layers pooled (L*N rows),
// p = softmax over all E, f[j, e] = fraction of tokens whose j-th choice is e,
// P[e] = mean p[:, e], aux = E * sum_{j,e} f[j, e] * P[e]. Perfectly balanced routing gives k.
// token_mask_N: optional (bool or 0/1) over the N tokens of one layer; padding (0) is excluded.
at::Tensor load_balancing_loss(const std::vector<at::Tensor>& logits_per_layer_NE,
                               const std::vector<at::Tensor>& topk_idx_per_layer_NK, const at::Tensor& token_mask_N = {});

// Global-batch balance (Qwen, arXiv 2501.11873; Megatron's global_aux_loss) in two parts, so that f can be counted
// over a whole optimizer step (every micro-batch of every rank) while each micro-batch keeps its own gradient.
// topk_counts: the top-k choices of the real rows counted per (choice j, expert e), layers pooled: [K, E] double on
// the CPU; `rows` receives the number of real rows counted (real tokens x layers).
at::Tensor topk_counts(const std::vector<at::Tensor>& topk_idx_per_layer_NK, int64_t num_experts,
                       const at::Tensor& token_mask_N, double* rows);
// One micro-batch's share of the step's loss: E * sum_{j,e} f[j, e] * S[e] / rows, with f = counts_KE / rows the
// step's fractions and S[e] this micro-batch's router probabilities summed over its real rows (layers pooled).
// The shares of the step's micro-batches add up to load_balancing_loss over all of them at once, value and gradient.
at::Tensor global_balancing_share(const std::vector<at::Tensor>& logits_per_layer_NE, const at::Tensor& counts_KE,
                                  double rows, const at::Tensor& token_mask_N = {});

// The sequence-wise form (DeepSeek-V3's complementary balance loss, Megatron's seq_aux_loss): the same loss over the
// tokens of each sequence alone (rows b*T .. b*T+T-1 of every layer, T = seq_len, layers pooled, padding excluded),
// averaged over the sequences that have a real token. Same scale as the batch form: balance within every
// sequence gives k (DeepSeek-V3 writes it divided by k).
at::Tensor sequence_balancing_loss(const std::vector<at::Tensor>& logits_per_layer_NE,
                                   const std::vector<at::Tensor>& topk_idx_per_layer_NK, int64_t seq_len,
                                   const at::Tensor& token_mask_N = {});

// Router z-loss (ST-MoE): mean over (layer, token) of logsumexp(logits)^2, padding excluded.
at::Tensor router_z_loss(const std::vector<at::Tensor>& logits_per_layer_NE, const at::Tensor& token_mask_N = {});

// Coefficient of variation (std / mean) of a load vector; 0 for perfectly even load.
double load_cv(const at::Tensor& load_E);

// How evenly one layer's token-expert assignments fall: the one definition the training log, the sweep
// report and the routing analysis share.
struct BalanceStats {
  double max_over_mean = 0;  // the busiest expert's load over the fair share (0 with no tokens)
  double cv = 0;             // std / mean (population std)
  int64_t dead_experts = 0;  // experts under 10% of the fair share
};
BalanceStats balance_stats(const std::vector<int64_t>& load_E);

}  // namespace moeforge
