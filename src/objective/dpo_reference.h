// The reference model of a DPO run, behind one call that gives the reference log-probs of a batch of pairs:
//   frozen:     a copy of init_from kept in memory (no gradient, eval mode);
//   adapters_off: the policy itself with its LoRA adapters switched off (no second model);
//   precompute: the log-probs of every training and held-out pair computed once at the start into
//               run_dir/reference_logps.json (with a fingerprint of the token ids, the model config, the
//               precision and init_from's files), reused by a resumed run when the fingerprint matches;
//               the reference model is freed before training. With adapters, the table comes from the policy
//               with its adapters off (at step 0, before any update), so no second model is built.
#pragma once
#include <torch/types.h>

#include <string>
#include <utility>
#include <vector>

#include "data/preference.h"
#include "model/decoder.h"
#include "model/finetune.h"
#include "recipe/recipe.h"

namespace moeforge::train {

class DpoReference {
 public:
  // Refers to `r`, `train` and `val`, which must outlive it (the DPO stage owns all three).
  DpoReference(const Recipe& r, const std::vector<data::PreferencePair>& train,
               const std::vector<data::PreferencePair>& val);
  DpoReference(const DpoReference&) = delete;
  DpoReference& operator=(const DpoReference&) = delete;
  // Builds the frozen model or the table (only the main rank writes the table file).
  void start(const std::string& run_dir, const torch::Device& device, bool main_rank, MixtralForCausalLM& policy,
             const GroupXor& experts_xor);
  // Reference log-prob sums {chosen [n], rejected [n]} of pairs idx of the training set or the held-out set.
  // Training and held-out pairs alike go through the precision the policy trains in (runtime.precision).
  std::pair<torch::Tensor, torch::Tensor> logps(bool training_set, const std::vector<size_t>& idx,
                                                const torch::Device& device, MixtralForCausalLM& policy);

 private:
  std::string fingerprint() const;
  bool load_table(const std::string& path, const std::string& fp);

  const Recipe& r_;
  const std::vector<data::PreferencePair>& train_;
  const std::vector<data::PreferencePair>& val_;
  MixtralForCausalLM ref_{nullptr};
  torch::Tensor table_[4];  // train chosen, train rejected, val chosen, val rejected
};

}  // namespace moeforge::train
