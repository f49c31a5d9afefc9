// The pretraining objective: next-token cross-entropy plus the MoE balancing terms.
#pragma once
#include <torch/types.h>

#include <vector>

#include "data/lm_dataset.h"
#include "model/decoder.h"
#include "objective/batch_loss.h"

namespace moeforge::train {


// Balancing terms are computed per micro-batch (as HF and Megatron do); z-loss and cross-entropy
// are token means, so accumulating micro-batches equals one large batch for them. `total` is
// ce + aux_coef * aux + z_coef * z (each when switched on; aux_loss_coef < 0: the model config's);
// `loss` the cross-entropy.
BatchLoss lm_loss(MixtralForCausalLM& model, const data::LmBatch& batch, const torch::Device& device,
                  double aux_loss_coef = -1);

}  // namespace moeforge::train
