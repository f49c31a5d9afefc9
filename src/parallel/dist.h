// Processes working on one job: where a process stands (rank, world) from the standard environment
// variables (torchrun, Slurm through a wrapper, mpirun with -x, or `moeforge launch`), and the c10d
// collectives the trainer needs, on Gloo (CPU). A world of one needs no store and no network.
#pragma once
#include <ATen/core/Tensor.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

namespace moeforge::parallel {

struct DistEnv {
  int rank = 0, world_size = 1, local_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  bool distributed = false;  // WORLD_SIZE given and > 1
};

// RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. None set: one process. A value that is not a
// number, out of range, or missing while WORLD_SIZE > 1 is a UserError naming the variable.
DistEnv read_dist_env();

// The device of a local rank: with `cuda`, GPU local_rank mod the GPUs present (each local rank its own); else the CPU.
// The one rule for training and inference.
at::Device local_rank_device(bool cuda, int local_rank);

// A process group: the world, or a subset of its ranks. Collectives take tensors on any device (moved
// to the backend's: CPU for Gloo, the rank's GPU for NCCL); a group of one performs none.
class Group {
 public:
  struct Impl;
  Group(std::unique_ptr<Impl> impl, int rank, int size, std::string name);
  ~Group();
  int rank() const { return rank_; }
  int size() const { return size_; }
  const std::string& name() const { return name_; }
  // In-place sum (fp32/fp64/int64; Gloo in LibTorch 1.13 has no AVG and no bf16).
  void all_reduce_sum(std::vector<at::Tensor>& tensors);
  // Rows of x [R, ...]: in_splits[j] rows go to group rank j, in order; returns the rows received,
  // out_splits[j] of them from group rank j, in rank order.
  at::Tensor all_to_all(const at::Tensor& x, const std::vector<int64_t>& in_splits,
                        const std::vector<int64_t>& out_splits);
  void barrier();

 private:
  std::unique_ptr<Impl> impl_;
  int rank_ = 0, size_ = 1;
  std::string name_;
};

class Dist {
 public:
  // World of one: every collective is the identity.
  Dist();
  // Rendezvous through a c10d TCPStore at MASTER_ADDR:MASTER_PORT (rank 0 serves it), then a Gloo
  // process group; `timeout` bounds the rendezvous and every collective. On a CUDA `device` with NCCL
  // built in (MOEFORGE_WITH_NCCL), the collectives run on NCCL over that device's tensors.
  Dist(const DistEnv& env, std::chrono::milliseconds timeout, at::Device device = at::kCPU);
  ~Dist();
  Dist(const Dist&) = delete;
  Dist& operator=(const Dist&) = delete;

  int rank() const { return rank_; }
  int world_size() const { return world_; }
  bool is_main() const { return rank_ == 0; }
  Group& world() { return *world_group_; }

  // A group of the given world ranks (sorted, containing this rank), under its own store prefix `name`.
  // Every member must create it, with the same name and ranks.
  std::shared_ptr<Group> new_group(const std::string& name, const std::vector<int>& ranks);

  void all_reduce_sum(std::vector<at::Tensor>& tensors) { world_group_->all_reduce_sum(tensors); }
  void barrier() { world_group_->barrier(); }

  struct Impl;  // defined in dist.cpp

 private:
  std::unique_ptr<Impl> impl_;
  std::shared_ptr<Group> world_group_;
  int rank_ = 0, world_ = 1;
};

}  // namespace moeforge::parallel
