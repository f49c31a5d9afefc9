// The training loop: one loop for every stage; a stage is an objective plus a dataset.
#pragma once
#include <string>

#include "recipe/recipe.h"

namespace moeforge::train {

struct TrainResult {
  std::string run_dir;
  int64_t steps = 0;
  double final_train_loss = 0, final_val_loss = 0;
  double tokens_per_second = 0, mfu = 0;
};

// Runs the recipe. `force_resume` is --resume (same as `resume: auto`).
TrainResult run_training(const Recipe& recipe, bool force_resume);

// Model FLOPs per token for training: 6 * active parameters (embedding lookups excluded) plus
// attention 12 * layers * seq_len * q_dim (forward + backward of QK^T and AV, causal not discounted).
double training_flops_per_token(const ModelConfig& c, int64_t seq_len);

// GFLOP/s of a large matmul in `precision` (fp32 | bf16) on `device`, measured now: the peak that MFU
// divides by.
double measure_peak_gflops(const std::string& device, const std::string& precision);

// The process's peak resident memory (VmHWM) in bytes; 0 where /proc does not tell.
int64_t peak_rss_bytes();

// Entropy in nats of the tokens under their own unigram distribution.
double unigram_entropy(const std::string& data_dir, const std::string& split);

}  // namespace moeforge::train
