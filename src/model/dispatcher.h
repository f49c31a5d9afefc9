// How tokens reach their experts. The MoE block is written for one device and calls
// this interface; the local dispatcher sorts tokens by expert, an expert-parallel one
// (src/parallel/) adds the all-to-all exchange. Same model code either way.
#pragma once
#include <ATen/core/Tensor.h>

#include <memory>
#include <vector>

namespace moeforge {

struct Dispatched {
  at::Tensor x_grouped;         // rows for the local experts, grouped by local expert in order
  std::vector<int64_t> counts;  // rows per local expert (host side; the one sync in the hot loop)
  std::shared_ptr<void> state;  // whatever combine() needs to undo the grouping
};

class Dispatcher {
 public:
  virtual ~Dispatcher() = default;
  // Global id of the first expert held here and how many are held.
  virtual int64_t first_local_expert() const = 0;
  virtual int64_t num_local_experts() const = 0;
  // x [N, H], topk_idx [N, K] (global expert ids), tokens_per_expert [E] (all experts).
  virtual Dispatched dispatch(const at::Tensor& x_NH, const at::Tensor& topk_idx_NK,
                              const at::Tensor& tokens_per_expert_E) = 0;
  // y_grouped has the rows of d.x_grouped after the experts; returns [N, H] = sum_k w_k * y_k.
  virtual at::Tensor combine(const at::Tensor& y_grouped, const Dispatched& d, const at::Tensor& topk_weight_NK) = 0;
};

// All experts on this process: one stable sort of the N*K assignments by expert id.
class LocalDispatcher : public Dispatcher {
 public:
  explicit LocalDispatcher(int64_t num_experts) : num_experts_(num_experts) {}
  int64_t first_local_expert() const override { return 0; }
  int64_t num_local_experts() const override { return num_experts_; }
  Dispatched dispatch(const at::Tensor& x_NH, const at::Tensor& topk_idx_NK,
                      const at::Tensor& tokens_per_expert_E) override;
  at::Tensor combine(const at::Tensor& y_grouped, const Dispatched& d, const at::Tensor& topk_weight_NK) override;

 private:
  int64_t num_experts_;
};

// Helpers shared with the expert-parallel dispatcher.
// Permutation that sorts the flattened [N*K] expert ids (stable: ties keep token order).
at::Tensor sort_assignments_by_expert(const at::Tensor& topk_idx_NK);
// Weighted combine: rows in `flat_order` (the sort permutation) come back to [N, K] and sum with weights.
at::Tensor unsort_and_combine(const at::Tensor& y_sorted, const at::Tensor& sort_perm, const at::Tensor& topk_weight_NK);

}  // namespace moeforge
