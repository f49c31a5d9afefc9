#pragma once
#include <torch/nn/module.h>

#include <optional>

namespace moeforge {

// RMSNorm as in Mixtral: normalise in fp32, scale by a learned weight (initialised to 1).
class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(int64_t dim, double eps);
  // The output is in `out` when given (the compute dtype of mixed precision), else in x's dtype.
  torch::Tensor forward(const torch::Tensor& x, std::optional<at::ScalarType> out = std::nullopt);
  torch::Tensor weight;
  double eps;
};
TORCH_MODULE(RMSNorm);

}  // namespace moeforge
