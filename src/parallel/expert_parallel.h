// Expert parallelism: each MoE layer's experts split evenly over the ranks of an expert-parallel group.
// Tokens travel to the rank holding their expert and back by two all-to-all exchanges, each an autograd
// function whose backward is the same exchange with the splits swapped. The model code does not change:
// the MoE block's dispatcher and expert bank are swapped (torchtitan's rule: parallelism from outside).
#pragma once
#include <memory>

#include "model/decoder.h"
#include "model/dispatcher.h"
#include "model/moe_block.h"
#include "parallel/dist.h"

namespace moeforge::parallel {

class ExpertParallelDispatcher : public Dispatcher {
 public:
  ExpertParallelDispatcher(std::shared_ptr<Group> group, int64_t num_experts);
  int64_t first_local_expert() const override { return group_->rank() * local_; }
  int64_t num_local_experts() const override { return local_; }
  Dispatched dispatch(const at::Tensor& x_NH, const at::Tensor& topk_idx_NK,
                      const at::Tensor& tokens_per_expert_E) override;
  at::Tensor combine(const at::Tensor& y_grouped, const Dispatched& d, const at::Tensor& topk_weight_NK) override;

 private:
  std::shared_ptr<Group> group_;
  int64_t num_experts_, local_;
};

// Rows of x to the ranks of `group` (in_splits[j] to rank j); backward sends the gradient back.
at::Tensor all_to_all_autograd(const at::Tensor& x, Group& group, const std::vector<int64_t>& in_splits,
                               const std::vector<int64_t>& out_splits);

// Routes every MoE layer through the group. A model built with this rank's share of the experts
// (expert_range_of) keeps its banks; a whole model keeps only this rank's experts (the modules move).
// num_experts must be divisible by the group size (UserError otherwise).
void apply_expert_parallel(MixtralForCausalLM& model, const std::shared_ptr<Group>& group);
// The experts rank `rank` of an expert-parallel group of `size` holds (UserError if size does not divide E).
ExpertRange expert_range_of(int64_t num_experts, int rank, int size);
void apply_expert_parallel(MoEBlock& block, const ModelConfig& cfg, const std::shared_ptr<Group>& group);

}  // namespace moeforge::parallel
