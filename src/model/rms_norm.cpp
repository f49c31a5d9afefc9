#include "model/rms_norm.h"

#include <torch/torch.h>

namespace moeforge {

RMSNormImpl::RMSNormImpl(int64_t dim, double eps_) : eps(eps_) {
  weight = register_parameter("weight", torch::ones({dim}));
}

torch::Tensor RMSNormImpl::forward(const torch::Tensor& x, std::optional<at::ScalarType> out) {
  const auto dt = out.value_or(x.scalar_type());
  auto acc = x.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  auto xf = x.to(acc);
  auto var = xf.pow(2).mean(-1, /*keepdim=*/true);
  auto normed = (xf * torch::rsqrt(var + eps)).to(dt);
  return weight.to(dt) * normed;
}

}  // namespace moeforge
