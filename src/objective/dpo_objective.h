// The DPO objective on a model: completion log-probs of packed sequences, then dpo_loss.
#pragma once
#include <torch/types.h>

#include <functional>
#include <string>
#include <vector>

#include "data/preference.h"
#include "model/decoder.h"
#include "objective/batch_loss.h"
#include "eval/evaluate.h"

namespace moeforge::train {

struct DpoOptions {
  double beta = 0.1;
  std::string loss = "sigmoid";  // sigmoid | ipo | hinge | robust
  double label_smoothing = 0.0;
  double aux_loss_coef = -1;     // < 0: the model config's
  double rpo_alpha = 0.0;        // > 0: adds alpha x the chosen completions' NLL per token (TRL's rpo_alpha;
                                 // Pang et al. 2024, "Iterative Reasoning Preference Optimization")
};

struct SequenceLogps {
  torch::Tensor logps;   // [S] sum of log p(token) over each sequence's completion tokens (fp32)
  torch::Tensor tokens;  // [S] completion tokens per sequence (float)
  ForwardOutput out;     // the forward (router outputs for the balancing terms)
  torch::Tensor valid;   // [B*T] 1 on real tokens, 0 on padding
};

// Packs `seqs` into rows of `seq_len` predictions (attention kept inside each sequence) and sums the
// log-probs of the tokens under each sequence's loss mask. Autograd flows when grad mode is on.
SequenceLogps sequence_logps(MixtralForCausalLM& model, const std::vector<const data::TokenizedExample*>& seqs,
                             int64_t seq_len, const torch::Device& device);

// Reference log-prob sums of `pairs[idx]` without gradient, in eval mode, `batch` pairs at a time:
// returns {chosen [N], rejected [N]} on the CPU.
std::pair<torch::Tensor, torch::Tensor> reference_logps(MixtralForCausalLM& model,
                                                        const std::vector<data::PreferencePair>& pairs,
                                                        const std::vector<size_t>& idx, int64_t batch, int64_t seq_len,
                                                        const torch::Device& device);

// One DPO micro-batch: the policy forward on chosen and rejected of `pairs[idx]` against the reference
// log-probs (CPU tensors [n]), plus the MoE balancing terms on the policy forward only. `metrics` gets
// TRL's names: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen,
// logps/rejected (means over the pairs).
BatchLoss dpo_batch(MixtralForCausalLM& model, const std::vector<data::PreferencePair>& pairs,
                    const std::vector<size_t>& idx, const torch::Tensor& ref_chosen, const torch::Tensor& ref_rejected,
                    const DpoOptions& opt, int64_t seq_len, const torch::Device& device);

// Mean DPO loss and metrics (weighted by pairs) over pairs[0, n) in batches of `batch`, without gradient and
// in eval mode; `ref(idx)` gives the reference log-probs {chosen, rejected} of a batch. perplexity is NaN.
EvalResult evaluate_pairs(MixtralForCausalLM& model, const std::vector<data::PreferencePair>& pairs, size_t n,
                          int64_t batch,
                          const std::function<std::pair<torch::Tensor, torch::Tensor>(const std::vector<size_t>&)>& ref,
                          const DpoOptions& opt, int64_t seq_len, const torch::Device& device);

}  // namespace moeforge::train
