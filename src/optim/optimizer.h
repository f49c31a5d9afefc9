// AdamW with decoupled weight decay (Loshchilov & Hutter), written here so that its state is
// plain named tensors: checkpoints, resharding and ZeRO-1 need nothing from LibTorch's optimizer classes.
#pragma once
#include <torch/types.h>

#include <map>
#include <string>
#include <vector>

namespace moeforge::train {

struct AdamWOptions {
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1;
};

// No weight decay on norm weights (and on anything 1-D).
bool decays(const std::string& name, const torch::Tensor& p);

class AdamW {
 public:
  // `owned` (ZeRO-1): state is kept, and updates are made, only for the parameters marked true (the
  // others are updated by the ranks that own them); empty = all.
  AdamW(const std::vector<std::pair<std::string, torch::Tensor>>& named_params, AdamWOptions opt,
        std::vector<bool> owned = {});
  // One update at learning rate `lr`; parameters without a gradient are skipped (their step does not advance).
  void step(double lr);
  void zero_grad();
  // Named state of the owned parameters: "exp_avg.<param>", "exp_avg_sq.<param>", "step.<param>" (fp32 /
  // int64 CPU tensors).
  std::vector<std::pair<std::string, torch::Tensor>> state() const;
  // Bytes of state this instance holds.
  int64_t state_bytes() const;
  // Restores the owned parameters' state; every such entry must be present with the right shape
  // (UserError naming `source` otherwise); entries of other parameters are ignored.
  void load_state(const std::map<std::string, torch::Tensor>& s, const std::string& source);
  const std::vector<std::string>& names() const { return names_; }

 private:
  AdamWOptions opt_;
  std::vector<std::string> names_;
  std::vector<torch::Tensor> params_, exp_avg_, exp_avg_sq_;
  std::vector<int64_t> steps_;
  std::vector<bool> decay_, owned_;
};

}  // namespace moeforge::train
