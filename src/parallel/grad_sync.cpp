#include "parallel/grad_sync.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>

namespace moeforge::parallel {

void sync_gradients(Group& group, const std::vector<torch::Tensor>& params, double divisor) {
  if (group.size() == 1) {
    torch::NoGradGuard ng;
    for (const auto& p : params)
      if (p.grad().defined()) p.grad().div_(divisor);
    return;
  }
  const int64_t P = static_cast<int64_t>(params.size());
  int64_t total = 0;
  for (const auto& p : params) total += p.numel();
  // On the parameters' device (NCCL reduces there; Gloo moves it through the host).
  auto buf = torch::zeros({total + P}, torch::TensorOptions().dtype(torch::kFloat).device(params[0].device()));
  int64_t off = 0;
  for (int64_t i = 0; i < P; ++i) {
    const auto& p = params[static_cast<size_t>(i)];
    if (p.grad().defined()) {
      buf.narrow(0, off, p.numel()).copy_(p.grad().reshape({-1}));
      buf[total + i] = 1.0f;
    }
    off += p.numel();
  }
  std::vector<torch::Tensor> v{buf};
  group.all_reduce_sum(v);
  const auto flags = buf.narrow(0, total, P).cpu();  // one copy, not one sync per parameter
  const float* has = flags.data_ptr<float>();
  off = 0;
  torch::NoGradGuard ng;
  for (int64_t i = 0; i < P; ++i) {
    auto p = params[static_cast<size_t>(i)];
    if (has[i] > 0) {
      auto g = buf.narrow(0, off, p.numel()).view(p.sizes()).div(divisor).to(p.dtype());
      if (p.grad().defined()) p.mutable_grad().copy_(g);
      else p.mutable_grad() = g.clone();
    }
    off += p.numel();
  }
}

std::vector<int> assign_owners(const std::vector<torch::Tensor>& params, int n) {
  std::vector<int64_t> load(static_cast<size_t>(n), 0);
  std::vector<int> owner;
  for (const auto& p : params) {
    const int k = static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());
    owner.push_back(k);
    load[static_cast<size_t>(k)] += p.numel();
  }
  return owner;
}

void share_updated_params(Group& group, const std::vector<torch::Tensor>& params,
                          const std::vector<int>& owner) {
  if (group.size() == 1 || params.empty()) return;
  torch::NoGradGuard ng;
  int64_t total = 0;
  for (const auto& p : params) total += p.numel();
  auto buf = torch::zeros({total}, torch::TensorOptions().dtype(torch::kFloat).device(params[0].device()));
  int64_t off = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    if (owner[i] == group.rank()) buf.narrow(0, off, params[i].numel()).copy_(params[i].reshape({-1}));
    off += params[i].numel();
  }
  std::vector<torch::Tensor> v{buf};
  group.all_reduce_sum(v);
  off = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    auto p = params[i];
    if (owner[i] != group.rank()) p.copy_(buf.narrow(0, off, p.numel()).view(p.sizes()));
    off += p.numel();
  }
}

double clip_grad_norm_sharded(const std::vector<torch::Tensor>& dense, const std::vector<torch::Tensor>& experts,
                              Group& ep_group, double max_norm) {
  torch::NoGradGuard ng;
  auto sq_sum = [](const std::vector<torch::Tensor>& ps) {
    std::vector<torch::Tensor> sq;
    for (const auto& p : ps)
      if (p.grad().defined()) sq.push_back(p.grad().to(torch::kFloat).pow(2).sum());
    return sq.empty() ? 0.0 : torch::stack(sq).sum().item<double>();
  };
  std::vector<torch::Tensor> v{torch::tensor({sq_sum(experts)}, torch::kDouble)};
  ep_group.all_reduce_sum(v);
  const double norm = std::sqrt(sq_sum(dense) + v[0].item<double>());
  if (max_norm > 0 && norm > max_norm) {
    const double scale = max_norm / (norm + 1e-6);
    for (const auto* ps : {&dense, &experts})
      for (const auto& p : *ps)
        if (p.grad().defined()) p.grad().mul_(scale);
  }
  return norm;
}

double clip_grad_norm(const std::vector<torch::Tensor>& params, double max_norm) {
  torch::NoGradGuard ng;
  std::vector<torch::Tensor> sq;
  for (const auto& p : params)
    if (p.grad().defined()) sq.push_back(p.grad().to(torch::kFloat).pow(2).sum());
  if (sq.empty()) return 0.0;
  const double norm = std::sqrt(torch::stack(sq).sum().item<double>());
  if (max_norm > 0 && norm > max_norm) {
    const double scale = max_norm / (norm + 1e-6);
    for (const auto& p : params)
      if (p.grad().defined()) p.grad().mul_(scale);
  }
  return norm;
}

}  // namespace moeforge::parallel
