// The SFT objective: cross-entropy on the target tokens only (assistant turns, or everything with
// train_on_all), averaged over target tokens, plus the MoE balancing terms over real (non-padding) tokens.
#pragma once
#include <torch/types.h>

#include <vector>

#include "data/sft_dataset.h"
#include "model/decoder.h"
#include "objective/batch_loss.h"

namespace moeforge::train {


// `aux_loss_coef` < 0 uses the model config's coefficient. `loss` is the mean cross-entropy over target
// tokens, `accuracy` the share of them predicted by argmax, `tokens` their count, `processed` the real
// tokens; `logits_out` (tests) receives the [B, T, V] logits.
BatchLoss sft_loss(MixtralForCausalLM& model, const data::PackedBatch& batch, const torch::Device& device,
                   double aux_loss_coef = -1, torch::Tensor* logits_out = nullptr);

}  // namespace moeforge::train
