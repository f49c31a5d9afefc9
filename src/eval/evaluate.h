#pragma once
#include <torch/types.h>

#include <map>
#include <string>

#include "data/lm_dataset.h"
#include "model/decoder.h"

namespace moeforge::train {

struct EvalResult {
  double loss = 0;        // mean next-token cross-entropy, nats
  double perplexity = 0;  // exp(loss)
  int64_t tokens = 0;
  std::map<std::string, double> metrics;  // stage-specific (DPO: rewards/accuracies, ...)
};

// Mean cross-entropy over the first `max_batches` batches (all when <= 0) of `sampler`'s
// windows in order (the sampler must not shuffle). Leaves the model in the mode it found it in.
EvalResult evaluate_lm(MixtralForCausalLM& model, data::LmSampler& sampler, int64_t batch_size, int64_t max_batches,
                       const torch::Device& device);

// Mean cross-entropy of `tokens` (with <s> first) in consecutive windows of `seq_len` predictions.
// `logprobs` (when given) receives log p(tokens[i + 1] | tokens[..i]) for every i, in fp64 from fp32 logits:
// what llama.cpp's per-position probabilities are compared with (tests/interop).
EvalResult evaluate_tokens(MixtralForCausalLM& model, const std::vector<int64_t>& tokens, int64_t seq_len,
                           const torch::Device& device, std::vector<double>* logprobs = nullptr);

}  // namespace moeforge::train
