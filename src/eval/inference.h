// The model an inference command (eval, generate, routing) runs a checkpoint with. In one process: the whole
// model. Started by `moeforge launch` (WORLD_SIZE > 1): expert parallelism over the world, as in training. Each
// rank builds and reads only the dense parameters and its share of the experts (a full checkpoint's tensors
// from its memory-mapped files in any layout; an adapter checkpoint's base share, checked by the fingerprint
// combined over the ranks, plus that share's adapters) and every MoE layer's tokens cross the all-to-all.
// Every rank runs the same inputs (no rank ever needs the whole model); rank 0 reports.
#pragma once
#include <torch/types.h>

#include <cstdint>
#include <memory>
#include <string>

#include "model/decoder.h"

namespace moeforge::parallel {
class Layout;
}

namespace moeforge::train {

class InferenceJob {
 public:
  // Joins the job the environment describes (none: one process) and sets the intra-op threads (`threads`, or
  // 0: the cores shared among the ranks on this machine). `command` names the command in errors.
  InferenceJob(const std::string& command, int threads);
  ~InferenceJob();
  InferenceJob(const InferenceJob&) = delete;
  InferenceJob& operator=(const InferenceJob&) = delete;

  int world() const;
  int rank() const;
  bool is_main() const;
  // The rank's device: its GPU (LOCAL_RANK) when CUDA is available, else the CPU.
  const torch::Device& device() const { return device_; }

  // `ckpt`'s model for this rank, on device(), computing in `precision` ("" = the checkpoint's): every expert
  // in one process, this rank's share of each layer's experts under expert parallelism.
  MixtralForCausalLM load(const std::string& ckpt, const std::string& precision = "");

  // Rank 0's `v` on every rank (what rank 0 sampled is what every rank continues with).
  int64_t agree(int64_t v);

 private:
  std::unique_ptr<parallel::Layout> layout_;
  torch::Device device_{torch::kCPU};
};

}  // namespace moeforge::train
