// Text generation with the KV cache: greedy, or temperature + nucleus (top-p) sampling.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "model/decoder.h"

namespace moeforge {

struct SamplingOptions {
  int64_t max_new_tokens = 128;
  double temperature = 0.0;  // 0 = greedy
  double top_p = 1.0;
  uint64_t seed = 0;
  int64_t eos_id = 2;        // stops generation (not returned); < 0 = never stop early
  int64_t vocab_limit = 0;   // > 0: only ids below it are produced (the tokenizer's size); 0 = every row
  // Under expert parallelism every rank generates: each picked token is replaced by agree(token) (rank 0's), so
  // the ranks never diverge on a logit that differs in its last bit. Empty: one process.
  std::function<int64_t(int64_t)> agree;
};

// Continues `prompt` (token ids, <s> included); `on_token` sees each new token as it is produced.
std::vector<int64_t> generate(MixtralForCausalLM& model, const std::vector<int64_t>& prompt, const SamplingOptions& opt,
                              const std::function<void(int64_t)>& on_token = {});

// The slow reference: recomputes the whole sequence for every new token (greedy only).
std::vector<int64_t> generate_uncached_greedy(MixtralForCausalLM& model, const std::vector<int64_t>& prompt,
                                              int64_t max_new_tokens, int64_t eos_id);

}  // namespace moeforge
