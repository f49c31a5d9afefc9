// What a stage trains on and how a batch becomes a loss: the one place where pretraining, supervised
// fine-tuning and preference tuning differ inside the training loop.
#pragma once
#include <torch/types.h>

#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "model/decoder.h"
#include "train/batch_loss.h"
#include "train/evaluate.h"
#include "train/recipe.h"

namespace moeforge::train {

class StageData {
 public:
  virtual ~StageData() = default;
  virtual std::string describe() const = 0;
  virtual const std::string& tokenizer() const = 0;
  // Called once the run directory exists, before the first batch (DPO builds its reference here);
  // only the main rank writes into the run directory.
  virtual void start(const std::string& run_dir, const torch::Device& device, bool main_rank) {
    (void)run_dir;
    (void)device;
    (void)main_rank;
  }
  // Micro-batch of `batch_size` samples starting at global sample index `first`.
  virtual BatchLoss train_batch(MixtralForCausalLM& model, int64_t first, int64_t batch_size,
                                const torch::Device& device) = 0;
  virtual EvalResult evaluate(MixtralForCausalLM& model, int64_t batch_size, int64_t max_batches,
                              const torch::Device& device) = 0;
  // Summary extras (e.g. the unigram entropy of the validation tokens).
  virtual void summarize(nlohmann::json& summary) = 0;
};

std::unique_ptr<StageData> make_stage_data(const Recipe& r);

}  // namespace moeforge::train
