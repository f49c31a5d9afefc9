// What one micro-batch of any stage reports to the training loop.
#pragma once
#include <torch/types.h>

#include <map>
#include <string>
#include <vector>

namespace moeforge::train {

struct BatchLoss {
  torch::Tensor total;  // backward() runs on this
  double loss = 0, aux = 0, z = 0, accuracy = 0;
  int64_t tokens = 0;     // tokens that carried loss (trained on)
  int64_t processed = 0;  // real (non-padding) tokens the forward ran on: throughput and MFU count these
  std::vector<torch::Tensor> load_per_layer;  // [E] token-expert assignments, CPU
  std::vector<double> entropy_per_layer;
  std::map<std::string, double> metrics;  // stage-specific means (DPO: rewards/chosen, ...)
};

}  // namespace moeforge::train
