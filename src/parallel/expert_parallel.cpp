#include "parallel/expert_parallel.h"

#include <torch/torch.h>

#include "core/error.h"
#include "model/moe_block.h"

namespace moeforge::parallel {

namespace {

class AllToAllFn : public torch::autograd::Function<AllToAllFn> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, int64_t group_ptr,
                               std::vector<int64_t> in_splits, std::vector<int64_t> out_splits) {
    ctx->saved_data["group"] = group_ptr;
    ctx->saved_data["in"] = in_splits;
    ctx->saved_data["out"] = out_splits;
    return reinterpret_cast<Group*>(group_ptr)->all_to_all(x, in_splits, out_splits);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto* g = reinterpret_cast<Group*>(ctx->saved_data["group"].toInt());
    auto in = ctx->saved_data["in"].toIntVector(), out = ctx->saved_data["out"].toIntVector();
    return {g->all_to_all(grads[0].contiguous(), out, in), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

struct EpState {
  at::Tensor sort_perm;     // [N*K] sorted position -> flat (token, choice)
  at::Tensor regroup;       // received row order -> grouped by local expert
  at::Tensor regroup_inv;
  std::vector<int64_t> in_splits, out_splits;
};

}  // namespace

at::Tensor all_to_all_autograd(const at::Tensor& x, Group& group, const std::vector<int64_t>& in_splits,
                               const std::vector<int64_t>& out_splits) {
  return AllToAllFn::apply(x, reinterpret_cast<int64_t>(&group), in_splits, out_splits);
}

ExpertParallelDispatcher::ExpertParallelDispatcher(std::shared_ptr<Group> group, int64_t num_experts)
    : group_(std::move(group)), num_experts_(num_experts), local_(num_experts / group_->size()) {
  MF_CHECK(num_experts % group_->size() == 0, "experts divide evenly over the expert-parallel ranks");
}

Dispatched ExpertParallelDispatcher::dispatch(const at::Tensor& x_NH, const at::Tensor& topk_idx_NK,
                                              const at::Tensor& tokens_per_expert_E) {
  const int64_t K = topk_idx_NK.size(1), W = group_->size(), El = local_;
  auto st = std::make_shared<EpState>();
  st->sort_perm = sort_assignments_by_expert(topk_idx_NK);
  auto x_sorted = x_NH.index_select(0, st->sort_perm.div(K, "floor"));  // grouped by global expert
  // Counts: this rank's rows per expert go to the experts' owners; each owner learns, per source rank,
  // how many rows each of its experts will receive.
  auto counts = tokens_per_expert_E.to(at::kCPU).to(at::kLong).contiguous().view({num_experts_, 1});
  auto recv = group_->all_to_all(counts, std::vector<int64_t>(static_cast<size_t>(W), El),
                                 std::vector<int64_t>(static_cast<size_t>(W), El))
                  .view({W, El});
  const int64_t* c = counts.data_ptr<int64_t>();
  const int64_t* rc = recv.data_ptr<int64_t>();
  st->in_splits.assign(static_cast<size_t>(W), 0);
  st->out_splits.assign(static_cast<size_t>(W), 0);
  for (int64_t j = 0; j < W; ++j)
    for (int64_t e = 0; e < El; ++e) {
      st->in_splits[static_cast<size_t>(j)] += c[j * El + e];
      st->out_splits[static_cast<size_t>(j)] += rc[j * El + e];
    }
  auto x_recv = all_to_all_autograd(x_sorted, *group_, st->in_splits, st->out_splits);  // source-major
  // Regroup the received rows by local expert (source order kept inside each expert).
  std::vector<int64_t> start(static_cast<size_t>(W * El));
  int64_t off = 0;
  for (int64_t s = 0; s < W; ++s)
    for (int64_t e = 0; e < El; ++e) {
      start[static_cast<size_t>(s * El + e)] = off;
      off += rc[s * El + e];
    }
  std::vector<int64_t> order;
  order.reserve(static_cast<size_t>(off));
  Dispatched d;
  d.counts.assign(static_cast<size_t>(El), 0);
  for (int64_t e = 0; e < El; ++e)
    for (int64_t s = 0; s < W; ++s) {
      const int64_t n = rc[s * El + e], b = start[static_cast<size_t>(s * El + e)];
      for (int64_t i = 0; i < n; ++i) order.push_back(b + i);
      d.counts[static_cast<size_t>(e)] += n;
    }
  st->regroup = torch::tensor(order, torch::kLong).to(x_NH.device());
  st->regroup_inv = torch::empty_like(st->regroup);
  if (off > 0) st->regroup_inv.scatter_(0, st->regroup, torch::arange(off, st->regroup.options()));
  d.x_grouped = x_recv.index_select(0, st->regroup);
  d.state = st;
  return d;
}

at::Tensor ExpertParallelDispatcher::combine(const at::Tensor& y_grouped, const Dispatched& d,
                                             const at::Tensor& topk_weight_NK) {
  auto st = std::static_pointer_cast<EpState>(d.state);
  auto y_recv = y_grouped.index_select(0, st->regroup_inv);  // back to source-major
  auto y_sorted = all_to_all_autograd(y_recv, *group_, st->out_splits, st->in_splits);
  return unsort_and_combine(y_sorted, st->sort_perm, topk_weight_NK);
}

ExpertRange expert_range_of(int64_t num_experts, int rank, int size) {
  if (num_experts % size != 0)
    throw UserError("parallel.expert: " + std::to_string(size) + " does not divide model.moe.num_experts (" +
                    std::to_string(num_experts) + ")");
  const int64_t El = num_experts / size;
  return {rank * El, El};
}

void apply_expert_parallel(MoEBlock& block, const ModelConfig& cfg, const std::shared_ptr<Group>& group) {
  const int64_t E = cfg.moe.num_experts;
  const ExpertRange share = expert_range_of(E, group->rank(), group->size());
  const int64_t El = share.count, first = share.first;
  auto dispatcher = std::make_shared<ExpertParallelDispatcher>(group, E);
  if (block->experts->first() == first && block->experts->count() == El) {  // built with this rank's share
    block->set_dispatcher(dispatcher, block->experts);
    return;
  }
  MF_CHECK(block->experts->count() == E, "a bank is either whole or this rank's share");
  torch::NoGradGuard ng;
  // The expert modules themselves move to the new bank (no copy; a quantised base goes with them), and
  // stacked adapters, if already attached, are cut to this rank's experts.
  std::vector<Expert> mine;
  for (int64_t e = first; e < first + El; ++e) mine.push_back(block->experts->expert(e));
  ExpertBank bank(first, mine);
  if (block->experts->has_lora()) {
    std::array<at::Tensor, 3> A, B;
    for (size_t j = 0; j < 3; ++j) {
      if (!block->experts->lora_A[j].defined()) continue;
      A[j] = block->experts->lora_A[j].narrow(0, first, El).clone().set_requires_grad(true);
      B[j] = block->experts->lora_B[j].narrow(0, first, El).clone().set_requires_grad(true);
    }
    bank->set_lora(A, B, block->experts->lora_scale, block->experts->lora_rt);
  }
  block->set_dispatcher(dispatcher, bank);
}

void apply_expert_parallel(MixtralForCausalLM& model, const std::shared_ptr<Group>& group) {
  for (auto& block : model->moe_blocks()) apply_expert_parallel(block, model->config(), group);
}

}  // namespace moeforge::parallel
