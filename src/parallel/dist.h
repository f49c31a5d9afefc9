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

class Dist {
 public:
  // World of one: every collective is the identity.
  Dist();
  // Rendezvous through a c10d TCPStore at MASTER_ADDR:MASTER_PORT (rank 0 serves it), then a Gloo
  // process group; `timeout` bounds the rendezvous and every collective.
  Dist(const DistEnv& env, std::chrono::milliseconds timeout);
  ~Dist();
  Dist(const Dist&) = delete;
  Dist& operator=(const Dist&) = delete;

  int rank() const { return rank_; }
  int world_size() const { return world_; }
  bool is_main() const { return rank_ == 0; }

  // In-place sum over all ranks (fp32/fp64/int64 CPU tensors; Gloo in LibTorch 1.13 has no AVG and no bf16).
  void all_reduce_sum(std::vector<at::Tensor>& tensors);
  void barrier();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  int rank_ = 0, world_ = 1;
};

}  // namespace moeforge::parallel
