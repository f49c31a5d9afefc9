#pragma once
#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>

#include <vector>

namespace moeforge {

// One SwiGLU expert: w2(silu(w1 x) * w3 x), no biases (HF names w1, w2, w3).
class ExpertImpl : public torch::nn::Module {
 public:
  ExpertImpl(int64_t hidden, int64_t intermediate);
  torch::Tensor forward(const torch::Tensor& x_NH);
  torch::nn::Linear w1{nullptr}, w2{nullptr}, w3{nullptr};
};
TORCH_MODULE(Expert);

// The experts of one MoE layer that live on this process: global ids
// [first, first + count), registered under their global id ("experts.5.w1.weight")
// so that names are the same whatever the expert-parallel layout.
class ExpertBankImpl : public torch::nn::Module {
 public:
  ExpertBankImpl(int64_t hidden, int64_t intermediate, int64_t first, int64_t count);
  // x grouped by local expert (rows of local expert i contiguous, in order), counts per local expert.
  torch::Tensor forward(const torch::Tensor& x_grouped, const std::vector<int64_t>& counts);
  Expert& expert(int64_t global_id) { return experts_.at(global_id - first_); }
  int64_t first() const { return first_; }
  int64_t count() const { return static_cast<int64_t>(experts_.size()); }

 private:
  int64_t first_;
  std::vector<Expert> experts_;
};
TORCH_MODULE(ExpertBank);

}  // namespace moeforge
