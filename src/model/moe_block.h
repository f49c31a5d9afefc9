#pragma once
#include <torch/nn/module.h>

#include <memory>

#include "model/config.h"
#include "model/dispatcher.h"
#include "model/experts.h"
#include "model/router.h"

namespace moeforge {

struct MoEOutput {
  torch::Tensor y;      // same shape as the input
  RouterOutput router;  // for the balancing losses and the routing statistics
};

// Dropless sparse MoE block: every token reaches its top-k experts. Registered as
// `block_sparse_moe` with children `gate` (router) and `experts`, and with moe.num_shared_experts S > 0
// `shared_expert` (one SwiGLU MLP of S x intermediate_size that every token passes through, held whole on every
// rank) and, with moe.shared_expert_gate, `shared_expert_gate` ([1, H]: the shared output times sigmoid(g . x)).
// y = sum_k w_k expert_k(x) + [sigmoid(g . x)] shared(x).
class MoEBlockImpl : public torch::nn::Module {
 public:
  explicit MoEBlockImpl(const ModelConfig& cfg, ExpertRange held = {});
  // x [..., H]. The router sees x as it comes (fp32); the experts see it in `compute` when given
  // (mixed precision), and y is in that dtype.
  MoEOutput forward(const torch::Tensor& x, std::optional<at::ScalarType> compute = std::nullopt);

  // Replaces the dispatcher (the expert-parallel layout swaps in an all-to-all one). The
  // expert bank must hold exactly the dispatcher's local experts.
  void set_dispatcher(std::shared_ptr<Dispatcher> d, ExpertBank bank);
  Dispatcher& dispatcher() { return *dispatcher_; }
  // Shared by a second model sharded like this one (the DPO reference routes through the same groups).
  std::shared_ptr<Dispatcher> shared_dispatcher() const { return dispatcher_; }

  Router gate{nullptr};
  ExpertBank experts{nullptr};
  Expert shared_expert{nullptr};               // undefined without shared experts
  torch::nn::Linear shared_expert_gate{nullptr};  // undefined without the gate

 private:
  std::shared_ptr<Dispatcher> dispatcher_;
};
TORCH_MODULE(MoEBlock);

}  // namespace moeforge
