#include "model/router.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include "core/compat.h"

namespace moeforge {

at::ScalarType router_dtype(at::ScalarType input) {
  return input == torch::kDouble ? torch::kDouble : torch::kFloat;
}

RouterImpl::RouterImpl(int64_t hidden, const MoEConfig& cfg)
    : num_experts(cfg.num_experts), top_k(cfg.num_experts_per_tok), jitter(cfg.router_jitter), balance(cfg.balance) {
  weight = register_parameter("weight", torch::empty({num_experts, hidden}));
  expert_bias = register_buffer("expert_bias", torch::zeros({num_experts}));
  jitter_gen_ = at::make_generator<at::CPUGeneratorImpl>(0);
}

void RouterImpl::seed_jitter(uint64_t seed) {
  std::lock_guard<std::mutex> lock(jitter_gen_.mutex());
  jitter_gen_.set_current_seed(seed);
}

RouterOutput RouterImpl::forward(const torch::Tensor& x_NH) {
  RouterOutput r;
  auto dt = router_dtype(x_NH.scalar_type());
  auto x = x_NH.to(dt);
  if (is_training() && jitter > 0) {
    torch::Tensor noise;
    if (x.is_cuda()) {  // drawn on the device, from a generator seeded by this router's stream
      uint64_t seed = 0;
      {
        std::lock_guard<std::mutex> lock(jitter_gen_.mutex());
        seed = jitter_gen_.get<at::CPUGeneratorImpl>()->random64();
      }
      noise = compat::uniform_noise(x.sizes(), 1.0 - jitter, 1.0 + jitter, seed, x.options());
    } else {
      noise = torch::empty(x.sizes(), x.options()).uniform_(1.0 - jitter, 1.0 + jitter, jitter_gen_);  // locks it itself
    }
    x = x * noise;
  }
  r.logits_NE = torch::nn::functional::linear(x, weight.to(dt));
  if (extras.lora.defined() && lora_rt && lora_rt->enabled) {  // LoRA on the router ("gate"), in fp32 like the rest
    r.logits_NE = add_lora(r.logits_NE, x, folded(extras.lora, dt), *lora_rt, is_training());
  }
  torch::Tensor chosen_logits;
  if (balance == Balance::AuxFreeBias) {
    auto scores = r.logits_NE.detach() + expert_bias.to(dt);
    r.topk_idx_NK = std::get<1>(scores.topk(top_k, -1));
    chosen_logits = r.logits_NE.gather(1, r.topk_idx_NK);
  } else {
    auto tk = r.logits_NE.topk(top_k, -1);
    chosen_logits = std::get<0>(tk);
    r.topk_idx_NK = std::get<1>(tk);
  }
  r.topk_weight_NK = torch::softmax(chosen_logits, -1);
  {
    torch::NoGradGuard ng;
    r.tokens_per_expert = torch::bincount(r.topk_idx_NK.reshape({-1}), {}, num_experts);
    if (x_NH.size(0) > 0) {
      auto logp = torch::log_softmax(r.logits_NE.detach(), -1);
      r.entropy = -(logp.exp() * logp).sum(-1).mean();
    } else {
      r.entropy = torch::zeros({}, r.logits_NE.options());
    }
  }
  return r;
}

void RouterImpl::update_expert_bias(const torch::Tensor& load_E, double rate, BiasUpdate form) {
  torch::NoGradGuard ng;
  auto load = load_E.to(expert_bias.device()).to(torch::kFloat);
  const auto mean = load.mean();
  auto step = form == BiasUpdate::Sign ? torch::sign(mean - load) * rate
                                       : (mean - load) / mean.clamp_min(1e-12) * rate;
  expert_bias.add_(step.to(expert_bias.scalar_type()));
  expert_bias.sub_(expert_bias.mean());
}

}  // namespace moeforge
