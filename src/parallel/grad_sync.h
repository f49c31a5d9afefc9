// Gradient and parameter exchange between the ranks of a training job: data-parallel gradient
// averaging, global-norm clipping with sharded experts, and ZeRO-1's ownership and parameter sharing.
// The trainer decides which parameters go to which group; these functions do the exchange.
#pragma once
#include <ATen/core/Tensor.h>

#include <vector>

#include "parallel/dist.h"

namespace moeforge::parallel {

// Gradients of parameters that `group` holds copies of: summed over the group in one fp32 bucket (on
// the parameters' device), then divided by `divisor` (the world size: every rank's loss is 1/W of the
// global mean). A parameter no rank touched (an expert without tokens) keeps no gradient, as in one process.
void sync_gradients(Group& group, const std::vector<at::Tensor>& params, double divisor);

// Total L2 norm of the gradients of parameters every rank holds whole (one process, or data parallelism
// alone); scales them down to `max_norm` when above it (0 = no clipping). Returns the norm before clipping.
double clip_grad_norm(const std::vector<at::Tensor>& params, double max_norm);

// Clipping by the global norm when the expert parameters are sharded: every expert counted once (the
// squared norms of the local experts summed over the expert-parallel group; dense ones are replicated).
// Returns the norm before clipping (0 = no clipping).
double clip_grad_norm_sharded(const std::vector<at::Tensor>& dense, const std::vector<at::Tensor>& experts,
                              Group& ep_group, double max_norm);

// ZeRO-1: each parameter's optimizer state lives on one of the `n` ranks holding copies of it; whole
// tensors, given in order to the least-loaded rank, so every rank computes the same assignment.
std::vector<int> assign_owners(const std::vector<at::Tensor>& params, int n);

// After a ZeRO-1 step: each parameter's owner (group rank) has updated it; the others receive the new
// values (a sum over `group` in which only the owner contributes, exact in fp32).
void share_updated_params(Group& group, const std::vector<at::Tensor>& params, const std::vector<int>& owner);

}  // namespace moeforge::parallel
