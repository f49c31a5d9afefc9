#include "model/moe_block.h"

#include <torch/torch.h>

#include "core/error.h"
#include "model/mixed.h"

namespace moeforge {

MoEBlockImpl::MoEBlockImpl(const ModelConfig& cfg, ExpertRange held) {
  gate = register_module("gate", Router(cfg.hidden_size, cfg.moe));
  const int64_t E = cfg.moe.num_experts;
  if (held.all()) held = {0, E};
  MF_CHECK(held.first >= 0 && held.count > 0 && held.first + held.count <= E, "held experts within [0, E)");
  experts = register_module("experts", ExpertBank(cfg.hidden_size, cfg.intermediate_size, held.first, held.count));
  dispatcher_ = std::make_shared<LocalDispatcher>(cfg.moe.num_experts);
  if (cfg.moe.num_shared_experts > 0) {
    shared_expert = register_module("shared_expert", Expert(cfg.hidden_size, cfg.shared_intermediate_size()));
    if (cfg.moe.shared_expert_gate)
      shared_expert_gate = register_module(
          "shared_expert_gate", torch::nn::Linear(torch::nn::LinearOptions(cfg.hidden_size, 1).bias(false)));
  }
}

void MoEBlockImpl::set_dispatcher(std::shared_ptr<Dispatcher> d, ExpertBank bank) {
  MF_CHECK(bank->first() == d->first_local_expert() && bank->count() == d->num_local_experts(),
           "expert bank and dispatcher must agree on the local experts");
  dispatcher_ = std::move(d);
  experts = replace_module("experts", bank);
}

MoEOutput MoEBlockImpl::forward(const torch::Tensor& x, std::optional<at::ScalarType> compute) {
  const auto H = x.size(-1);
  auto x_NH = x.reshape({-1, H});
  MoEOutput out;
  MF_CHECK(experts->count() == dispatcher_->num_local_experts(),
           "a block built with a share of the experts routes through an expert-parallel dispatcher");
  out.router = gate->forward(x_NH);
  const auto xc_NH = to_compute(x_NH, compute);  // one copy in the compute dtype for the routed and shared experts
  Dispatched d = dispatcher_->dispatch(xc_NH, out.router.topk_idx_NK, out.router.tokens_per_expert);
  auto y_grouped = experts->forward(d.x_grouped, d.counts);
  auto y_NH = dispatcher_->combine(y_grouped, d, out.router.topk_weight_NK);
  if (shared_expert) {
    auto s_NH = shared_expert->forward(xc_NH);
    // The gate, as the router, reads x in fp32; its scale meets the shared output in the compute dtype.
    if (shared_expert_gate) s_NH = s_NH * torch::sigmoid(mixed_linear(x_NH, shared_expert_gate->weight)).to(s_NH.scalar_type());
    y_NH = y_NH + s_NH.to(y_NH.scalar_type());
  }
  out.y = y_NH.view(x.sizes());
  return out;
}

}  // namespace moeforge
