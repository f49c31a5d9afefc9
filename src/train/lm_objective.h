// The pretraining objective: next-token cross-entropy plus the MoE balancing terms.
#pragma once
#include <torch/types.h>

#include <vector>

#include "data/lm_dataset.h"
#include "model/decoder.h"

namespace moeforge::train {

struct LmLoss {
  torch::Tensor total;  // what backward() runs on: ce + aux_coef * aux + z_coef * z (each when switched on)
  double ce = 0, aux = 0, z = 0;
  int64_t tokens = 0;
  std::vector<torch::Tensor> load_per_layer;  // [E] int64 token-expert assignments, CPU
  std::vector<double> entropy_per_layer;
};

// Balancing terms are computed per micro-batch (as HF and Megatron do); z-loss and cross-entropy
// are token means, so accumulating micro-batches equals one large batch for them.
LmLoss lm_loss(MixtralForCausalLM& model, const data::LmBatch& batch, const torch::Device& device);

}  // namespace moeforge::train
