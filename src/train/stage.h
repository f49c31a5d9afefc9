// A stage is what differs between pretraining, supervised fine-tuning and preference tuning inside the
// one training loop: its data, its objective and coefficients, what it logs and summarises, and (DPO) its
// reference. The loop asks the stage; it never asks which stage it is.
#pragma once
#include <torch/types.h>

#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "model/decoder.h"
#include "objective/batch_loss.h"
#include "eval/evaluate.h"
#include "recipe/recipe.h"

namespace moeforge::train {

class Stage {
 public:
  // The stage refers to `r`, which must outlive it (the trainer's recipe does).
  explicit Stage(const Recipe& r, double aux_loss_coef) : recipe_(r), aux_loss_coef_(aux_loss_coef) {}
  virtual ~Stage() = default;
  Stage(const Stage&) = delete;
  Stage& operator=(const Stage&) = delete;

  virtual std::string describe() const = 0;
  // The SentencePiece model checkpoints carry.
  virtual const std::string& tokenizer() const = 0;
  // Fine-tuning starts from a trained model: its held-out numbers are recorded at step 0, before any update.
  virtual bool evaluates_at_start() const { return true; }
  // Called once the run directory exists, before the first batch (DPO builds its reference here); only the
  // main rank writes into the run directory.
  // `model` is the policy (DPO's adapters_off reference is the policy without its adapters).
  virtual void start(const std::string& run_dir, const torch::Device& device, bool main_rank, MixtralForCausalLM& model,
                     const GroupXor& experts_xor) {}
  // Micro-batch of `batch_size` samples starting at global sample index `first`.
  virtual BatchLoss train_batch(MixtralForCausalLM& model, int64_t first, int64_t batch_size,
                                const torch::Device& device) = 0;
  // Held-out loss (perplexity NaN where the loss is not a likelihood) and the stage's metrics.
  virtual EvalResult evaluate(MixtralForCausalLM& model, int64_t batch_size, int64_t max_batches,
                              const torch::Device& device) = 0;
  // The objective backward ran on, from a logged step's averaged parts.
  virtual double total_loss(double loss, double aux, double z, const std::map<std::string, double>& metrics) const;
  // Summary extras (e.g. the unigram entropy of the validation tokens, examples skipped).
  virtual void summarize(nlohmann::json& summary) = 0;

  // The load-balancing coefficient this stage trains with (fine-tuning stages may set their own).
  double aux_loss_coef() const { return aux_loss_coef_; }

 protected:
  const Recipe& recipe_;
  double aux_loss_coef_;
};

std::unique_ptr<Stage> make_pretrain_stage(const Recipe& r);
std::unique_ptr<Stage> make_sft_stage(const Recipe& r);
std::unique_ptr<Stage> make_dpo_stage(const Recipe& r);
// The stage the recipe names.
std::unique_ptr<Stage> make_stage(const Recipe& r);

// Test hook shared by the stages: the file MOEFORGE_DUMP_BATCHES names, or "" when it is unset; append_to_test_dump
// appends bytes to it (one open per call, so a crash leaves every earlier micro-batch on disk).
std::string test_dump_path();
void append_to_test_dump(const std::string& path, const void* data, size_t size);

}  // namespace moeforge::train
