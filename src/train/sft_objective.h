// The SFT objective: cross-entropy on the target tokens only (assistant turns, or everything with
// train_on_all), averaged over target tokens, plus the MoE balancing terms over real (non-padding) tokens.
#pragma once
#include <torch/types.h>

#include <vector>

#include "data/sft_dataset.h"
#include "model/decoder.h"

namespace moeforge::train {

struct SftLoss {
  torch::Tensor total;       // for backward
  torch::Tensor logits;      // [B, T, V] (kept for tests)
  double loss = 0, aux = 0, z = 0, accuracy = 0;
  int64_t target_tokens = 0;
  std::vector<torch::Tensor> load_per_layer;  // [E] int64, CPU
  std::vector<double> entropy_per_layer;
};

// `aux_loss_coef` < 0 uses the model config's coefficient.
SftLoss sft_loss(MixtralForCausalLM& model, const data::PackedBatch& batch, const torch::Device& device,
                 double aux_loss_coef = -1);

}  // namespace moeforge::train
