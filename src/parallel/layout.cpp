#include "parallel/layout.h"

#include <torch/torch.h>

#include <cstdlib>
#include <thread>

#include "core/compat.h"
#include "core/error.h"
#include "model/param_names.h"
#include "parallel/expert_parallel.h"
#include "parallel/grad_sync.h"

namespace moeforge::parallel {

Layout::Layout(const DistEnv& env, const LayoutOptions& opt, at::Device device)
    : world_(env.world_size), rank_(env.rank), ep_(opt.expert), zero_(opt.zero && env.world_size > 1) {
  if (ep_ < 1) throw UserError(opt.source + ": key 'parallel.expert': must be positive, got " + std::to_string(ep_));
  if (world_ % ep_ != 0)
    throw UserError(opt.source + ": key 'parallel.expert': " + std::to_string(ep_) +
                    " does not divide the number of processes (" + std::to_string(world_) +
                    (world_ == 1 ? "; start the ranks with `moeforge launch --nproc-per-node N -- train ...`" : "") +
                    ")");
  dist_ = world_ > 1 ? std::make_unique<Dist>(env, opt.timeout, device) : std::make_unique<Dist>();
  if (ep_ > 1) {
    const int dp_rank = rank_ / ep_, ep_rank = rank_ % ep_;
    std::vector<int> ep_ranks, replica_ranks;
    for (int k = 0; k < ep_; ++k) ep_ranks.push_back(dp_rank * ep_ + k);
    for (int j = 0; j < data_parallel(); ++j) replica_ranks.push_back(j * ep_ + ep_rank);
    ep_group_ = dist_->new_group("ep" + std::to_string(dp_rank), ep_ranks);
    replica_group_ = dist_->new_group("experts" + std::to_string(ep_rank), replica_ranks);
  }
}

Layout::~Layout() = default;

std::string Layout::describe() const {
  if (world_ == 1) return "";
  return std::to_string(data_parallel()) + " data-parallel x " + std::to_string(ep_) + " expert-parallel";
}

ExpertRange Layout::held_experts(int64_t num_experts) const {
  if (ep_ == 1) return {};
  return expert_range_of(num_experts, rank_ % ep_, ep_);
}

uint64_t Layout::xor_over_expert_group(uint64_t v) {
  if (ep_ == 1) return v;
  // Each rank puts its value in its own slot (as the two 32-bit halves, exact in int64 sums).
  auto t = torch::zeros({2 * ep_}, torch::kLong);
  const int k = rank_ % ep_;
  t[2 * k] = static_cast<int64_t>(v >> 32);
  t[2 * k + 1] = static_cast<int64_t>(v & 0xffffffffULL);
  std::vector<at::Tensor> ts{t};
  ep_group_->all_reduce_sum(ts);
  uint64_t out = 0;
  for (int j = 0; j < ep_; ++j)
    out ^= (static_cast<uint64_t>(ts[0][2 * j].item<int64_t>()) << 32) | static_cast<uint64_t>(ts[0][2 * j + 1].item<int64_t>());
  return out;
}

void Layout::hold(MixtralForCausalLM& model, const std::function<void(MixtralForCausalLM&)>& after_split) {
  if (ep_ > 1) apply_expert_parallel(model, ep_group_);
  if (after_split) after_split(model);
  named_.clear();
  params_.clear();
  dense_.clear();
  experts_.clear();
  for (auto& p : model->named_parameters()) {
    if (!p.value().requires_grad()) continue;
    named_.emplace_back(p.key(), p.value());
    params_.push_back(p.value());
    (is_expert_param(p.key()) ? experts_ : dense_).push_back(p.value());
  }
  owned_.clear();
  if (!zero_) return;
  // Dense parameters have W copies (one per rank), experts DP copies (one per replica).
  dense_owner_ = assign_owners(dense_, world_);
  expert_owner_ = assign_owners(experts_, data_parallel());
  size_t di = 0, ei = 0;
  for (const auto& [name, p] : named_)
    owned_.push_back(is_expert_param(name) ? expert_owner_[ei++] == rank_ / ep_ : dense_owner_[di++] == rank_);
}

int64_t Layout::unsharded_state_bytes() const {
  int64_t b = 0;
  for (const auto& p : params_) b += p.numel() * 8 + 8;
  return b;
}

void Layout::sync_gradients() {
  if (world_ == 1) return;
  if (ep_ == 1) {
    parallel::sync_gradients(dist_->world(), params_, world_);  // everything replicated: one bucket
  } else {
    parallel::sync_gradients(dist_->world(), dense_, world_);
    parallel::sync_gradients(*replica_group_, experts_, world_);
  }
}

double Layout::clip_grad_norm(double max_norm) {
  return ep_ > 1 ? clip_grad_norm_sharded(dense_, experts_, *ep_group_, max_norm)
                 : parallel::clip_grad_norm(params_, max_norm);
}

void Layout::share_updated_parameters() {
  if (!zero_) return;
  share_updated_params(dist_->world(), dense_, dense_owner_);
  share_updated_params(ep_ > 1 ? *replica_group_ : dist_->world(), experts_, expert_owner_);
}

void Layout::all_reduce_sum(std::vector<at::Tensor>& tensors) { dist_->all_reduce_sum(tensors); }

int64_t Layout::from_main(int64_t v) { return sum(is_main() ? v : 0); }

int64_t Layout::sum(int64_t v) {
  if (world_ == 1) return v;
  std::vector<at::Tensor> t{torch::full({1}, v, torch::kLong)};
  dist_->all_reduce_sum(t);
  return t[0].item<int64_t>();
}

void Layout::barrier() { dist_->barrier(); }

ShardPlacement Layout::shard_placement() const {
  ShardPlacement s;
  s.expert_shards = ep_;
  s.expert_shard = rank_ % ep_;
  s.data_parallel = data_parallel();
  if (zero_) {
    s.optimizer_parts = world_;
    s.optimizer_part = rank_;
  }
  s.writes_experts = rank_ / ep_ == 0;
  return s;
}

void Layout::write_checkpoint(const std::function<void()>& prepare, const std::function<void()>& rank_files,
                              const std::function<void()>& finish) {
  if (shard_placement().sharded()) {
    if (is_main()) prepare();
    barrier();
    if (!is_main()) rank_files();
    barrier();
  }
  if (is_main()) finish();  // replicas hold the same weights and optimizer state
  barrier();
}

int configure_rank_threads(int requested, int world_size) {
  int want = requested;
  if (want == 0 && world_size > 1) {  // share the cores among the ranks of this machine
    const char* lws = std::getenv("LOCAL_WORLD_SIZE");
    const int local = lws ? std::max(1, std::atoi(lws)) : world_size;
    want = std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / local);
  }
  return compat::configure_threads(want);
}

}  // namespace moeforge::parallel
