// The parallel layout of a training job, built once: WORLD_SIZE processes = DP data-parallel replicas x EP
// expert-parallel ranks. Ranks d*EP .. d*EP+EP-1 form replica d's expert-parallel group (they split the
// experts of every MoE layer); the ranks holding the same experts, one per replica, form a replica group.
// The layout knows which parameters this rank holds and, under ZeRO-1, owns; it averages gradients,
// clips by the true global norm, shares ZeRO-1 updates and runs the sharded-checkpoint barrier sequence,
// so the training loop does none of that arithmetic itself (torchtitan's ParallelDims + parallelize split).
#pragma once
#include <ATen/core/Tensor.h>

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "model/decoder.h"
#include "parallel/dist.h"
#include "parallel/shard_placement.h"

namespace moeforge::parallel {

struct LayoutOptions {
  int expert = 1;      // EP: ranks that split one copy of the experts (must divide the world)
  bool zero = false;   // ZeRO-1: optimizer state of each parameter on one of its holders
  std::chrono::milliseconds timeout{300000};  // rendezvous and every collective
  std::string source;  // the recipe file, for errors ("r.yaml: key 'parallel.expert': ...")
};

class Layout {
 public:
  // Joins the job described by `env` (a world of one needs no store), checks that EP divides it, and
  // builds the expert-parallel and replica groups. `device`: where NCCL (if built in) reduces.
  Layout(const DistEnv& env, const LayoutOptions& opt, at::Device device);
  ~Layout();
  Layout(const Layout&) = delete;
  Layout& operator=(const Layout&) = delete;

  int world() const { return world_; }
  int rank() const { return rank_; }
  bool is_main() const { return rank_ == 0; }
  int data_parallel() const { return world_ / ep_; }
  int expert_parallel() const { return ep_; }
  bool zero() const { return zero_; }
  // "2 data-parallel x 2 expert-parallel" (empty for one process).
  std::string describe() const;

  // Global index of micro-batch `a` of this rank's step: W ranks x A micro-batches see what one process
  // sees with W x A accumulation steps.
  int64_t global_micro_batch(int64_t a) const { return a * world_ + rank_; }

  // The experts of each MoE layer this rank holds: build the model with it (no rank allocates the others).
  ExpertRange held_experts(int64_t num_experts) const;
  // XOR of `v` over this rank's expert-parallel group (a fingerprint of the expert shards each rank loaded).
  uint64_t xor_over_expert_group(uint64_t v);

  // Keeps this rank's share of the experts (EP > 1) and records the parameters it holds and, under ZeRO-1,
  // the ones whose optimizer state it keeps. Call once, after the weights are loaded.
  // `after_split` runs between the two (fine-tuning attaches adapters there). Only parameters that
  // require a gradient are held: a frozen base is neither synchronised, clipped nor optimised.
  void hold(MixtralForCausalLM& model, const std::function<void(MixtralForCausalLM&)>& after_split = {});
  const std::vector<std::pair<std::string, at::Tensor>>& named_parameters() const { return named_; }
  // Per parameter of named_parameters(): does this rank update it? Empty: every rank updates everything.
  const std::vector<bool>& owned() const { return owned_; }
  // Bytes of AdamW state for every parameter this rank holds (what it would keep without ZeRO-1).
  int64_t unsharded_state_bytes() const;

  // Averages gradients: dense parameters over the world, experts over their replicas, in fp32 buckets,
  // divided by the world size (each rank's loss is 1/W of the global mean).
  void sync_gradients();
  // Clips to `max_norm` (0: off) by the global gradient norm, each expert counted once; returns the norm.
  double clip_grad_norm(double max_norm);
  // After the optimizer step under ZeRO-1: every rank receives the new values of what others own.
  void share_updated_parameters();
  // In-place sums over the world (logged numbers).
  void all_reduce_sum(std::vector<at::Tensor>& tensors);
  // Rank 0's `v` on every rank, and the sum of `v` over the ranks (collectives).
  int64_t from_main(int64_t v);
  int64_t sum(int64_t v);
  void barrier();

  ShardPlacement shard_placement() const;
  // The sharded-checkpoint protocol: `prepare` on rank 0 (the staging directory), barrier, `rank_files` on
  // every other rank, barrier, `finish` on rank 0 (its own files and the rename), barrier. Unsharded: only
  // `finish` on rank 0, then the barrier.
  void write_checkpoint(const std::function<void()>& prepare, const std::function<void()>& rank_files,
                        const std::function<void()>& finish);

 private:
  std::unique_ptr<Dist> dist_;
  std::shared_ptr<Group> ep_group_, replica_group_;
  int world_ = 1, rank_ = 0, ep_ = 1;
  bool zero_ = false;
  std::vector<std::pair<std::string, at::Tensor>> named_;
  std::vector<at::Tensor> params_, dense_, experts_;
  std::vector<int> dense_owner_, expert_owner_;
  std::vector<bool> owned_;
};

// Intra-op threads for this rank: `requested`, or with 0 the machine's cores shared among the ranks on it
// (LOCAL_WORLD_SIZE, else the world size). Returns what LibTorch was set to.
int configure_rank_threads(int requested, int world_size);

}  // namespace moeforge::parallel
