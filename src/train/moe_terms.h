// The MoE terms of every objective (pretraining, SFT, DPO) in one place: the load-balancing loss and the
// router z-loss pooled over all layers (real tokens only), added when switched on, and the router
// statistics a micro-batch reports to the training loop.
#pragma once
#include <torch/types.h>

#include <vector>

#include "model/config.h"
#include "model/router.h"
#include "train/batch_loss.h"

namespace moeforge::train {

struct MoeTerms {
  torch::Tensor aux, z;  // scalars; with a gradient only when they are part of the objective
  torch::Tensor seq;     // the sequence-wise balancing loss, defined when seq_aux_loss_coef > 0
};

// Adds aux_coef * aux (balance aux_loss, aux_coef > 0; aux_coef < 0 = the config's coefficient), then
// seq_aux_loss_coef * the sequence-wise balancing loss over sequences of `seq_len` rows (> 0; with any balance
// mode, as DeepSeek-V3 pairs it with the bias) and z_loss_coef * z (> 0) to `total`. `valid_N` (optional, 0/1 per
// token of a layer) excludes padding.
MoeTerms add_moe_terms(torch::Tensor& total, const std::vector<RouterOutput>& router, const MoEConfig& moe,
                       double aux_coef, int64_t seq_len, const torch::Tensor& valid_N = {});

// The logged numbers of a micro-batch in two host transfers: `scalars` followed by each layer's router
// entropy (the entropies go into l.entropy_per_layer), then the loads (l.load_per_layer). Returns the
// scalars as doubles, in order.
std::vector<double> fetch_logged(BatchLoss& l, const std::vector<torch::Tensor>& scalars,
                                 const std::vector<RouterOutput>& router);

}  // namespace moeforge::train
