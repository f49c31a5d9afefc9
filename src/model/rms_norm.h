#pragma once
#include <torch/nn/module.h>

namespace moeforge {

// RMSNorm as in Mixtral: normalise in fp32, scale by a learned weight (initialised to 1).
class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(int64_t dim, double eps);
  torch::Tensor forward(const torch::Tensor& x);
  torch::Tensor weight;
  double eps;
};
TORCH_MODULE(RMSNorm);

}  // namespace moeforge
