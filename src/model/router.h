#pragma once
#include <ATen/core/Generator.h>
#include <torch/nn/module.h>

#include "model/config.h"
#include "model/lora.h"

namespace moeforge {

// What the router decided for N tokens, plus statistics for logging.
struct RouterOutput {
  torch::Tensor logits_NE;          // fp32 (fp64 for fp64 inputs), before any selection bias
  torch::Tensor topk_idx_NK;        // int64 expert ids, the j-th column is the j-th choice
  torch::Tensor topk_weight_NK;     // softmax over the k selected logits (rows sum to 1)
  torch::Tensor tokens_per_expert;  // int64 [E]: assignments per expert (all k choices)
  torch::Tensor entropy;            // scalar: mean entropy of softmax(logits) over tokens (no grad)
};

// The MoE router W_g (hidden -> E, no bias), registered as `block_sparse_moe.gate`.
// Logits are computed in fp32. Gate G(x) = softmax(TopK(x W_g, k)). With balance ==
// aux_free_bias a per-expert bias (buffer `expert_bias`) is added to the scores used to
// *select* experts only; the gate weights still come from the unbiased logits.
class RouterImpl : public torch::nn::Module {
 public:
  RouterImpl(int64_t hidden, const MoEConfig& cfg);
  RouterOutput forward(const torch::Tensor& x_NH);

  // Aux-loss-free balancing (DeepSeek-V3): bias += rate * sign(mean_load - load) (or, proportional,
  // rate * (mean_load - load) / mean_load), then re-centred to zero mean. `load_E` are token counts per expert
  // since the last update.
  void update_expert_bias(const torch::Tensor& load_E, double rate, BiasUpdate form = BiasUpdate::Sign);

  // The jitter noise comes from this router's own CPU generator (moved to the input's device), so no other
  // use of randomness shifts it and it is the same on every device: seeded by the trainer from the run seed,
  // its state saved in training checkpoints.
  void seed_jitter(uint64_t seed);
  at::Generator& jitter_generator() { return jitter_gen_; }

  torch::Tensor weight;       // [E, H]
  LinearExtras extras;        // fine-tuning: a LoRA adapter on the router (target "gate"); never quantised
  std::shared_ptr<LoraRuntime> lora_rt;
  torch::Tensor expert_bias;  // [E], buffer
  int64_t num_experts, top_k;
  double jitter;
  Balance balance;

 private:
  at::Generator jitter_gen_;
};
TORCH_MODULE(Router);

// fp32 for half/bf16/fp32 inputs, fp64 for fp64 inputs (used by the gradient checks).
at::ScalarType router_dtype(at::ScalarType input);

}  // namespace moeforge
