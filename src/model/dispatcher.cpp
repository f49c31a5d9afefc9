#include "model/dispatcher.h"

#include <ATen/ATen.h>

#include "core/error.h"

namespace moeforge {

namespace {
struct LocalState {
  at::Tensor sort_perm;  // [N*K]: position in the sorted order -> flat (token, choice) index
};
}  // namespace

at::Tensor sort_assignments_by_expert(const at::Tensor& topk_idx_NK) {
  auto flat = topk_idx_NK.reshape({-1});
  return std::get<1>(flat.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false));
}

at::Tensor unsort_and_combine(const at::Tensor& y_sorted, const at::Tensor& sort_perm, const at::Tensor& topk_weight_NK) {
  const int64_t N = topk_weight_NK.size(0), K = topk_weight_NK.size(1);
  // inverse permutation: flat index -> position in sorted order. A gather (index_select)
  // rather than a scatter-add keeps forward and backward deterministic.
  auto inv = at::empty_like(sort_perm);
  inv.scatter_(0, sort_perm, at::arange(sort_perm.size(0), sort_perm.options()));
  auto y = y_sorted.index_select(0, inv).view({N, K, y_sorted.size(-1)});
  auto w = topk_weight_NK.to(y.scalar_type()).unsqueeze(-1);
  return (y * w).sum(1);
}

Dispatched LocalDispatcher::dispatch(const at::Tensor& x_NH, const at::Tensor& topk_idx_NK,
                                     const at::Tensor& tokens_per_expert_E) {
  const int64_t K = topk_idx_NK.size(1);
  auto st = std::make_shared<LocalState>();
  st->sort_perm = sort_assignments_by_expert(topk_idx_NK);
  auto token_of = st->sort_perm.div(K, "floor");
  Dispatched d;
  d.x_grouped = x_NH.index_select(0, token_of);
  auto counts_cpu = tokens_per_expert_E.to(at::kCPU).to(at::kLong).contiguous();
  MF_CHECK(counts_cpu.numel() == num_experts_, "tokens_per_expert has one entry per expert");
  const int64_t* c = counts_cpu.data_ptr<int64_t>();
  d.counts.assign(c, c + num_experts_);
  d.state = st;
  return d;
}

at::Tensor LocalDispatcher::combine(const at::Tensor& y_grouped, const Dispatched& d, const at::Tensor& topk_weight_NK) {
  auto st = std::static_pointer_cast<LocalState>(d.state);
  return unsort_and_combine(y_grouped, st->sort_perm, topk_weight_NK);
}

}  // namespace moeforge
