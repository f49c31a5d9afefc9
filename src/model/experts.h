#pragma once
#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "model/lora.h"

namespace moeforge {

// The experts of each MoE layer that a process holds: global ids [first, first + count); count < 0: all of
// them. Expert parallelism builds each rank's model with its own range, so that no rank allocates experts
// it does not hold.
struct ExpertRange {
  int64_t first = 0;
  int64_t count = -1;
  bool all() const { return count < 0; }
};

// XOR of a rank's value over its expert-parallel group (parallel::Layout::xor_over_expert_group): a checked
// fingerprint covers every expert, and under expert parallelism each rank reads only its share of them.
// Empty: one process holding every expert.
using GroupXor = std::function<uint64_t(uint64_t)>;

// One expert's adapters (slices of its bank's stacked tensors) for w1, w2, w3.
struct ExpertAdapters {
  std::array<LoraAdapter, 3> lora;
  const LoraRuntime* rt = nullptr;
};

// One SwiGLU expert: w2(silu(w1 x) * w3 x), no biases (HF names w1, w2, w3).
class ExpertImpl : public torch::nn::Module {
 public:
  ExpertImpl(int64_t hidden, int64_t intermediate);
  torch::Tensor forward(const torch::Tensor& x_NH, const ExpertAdapters* adapters = nullptr);
  torch::nn::Linear w1{nullptr}, w2{nullptr}, w3{nullptr};
  // QLoRA: w1, w2, w3 stored quantised here (their float weights then empty).
  std::array<std::shared_ptr<const QuantizedWeight>, 3> quant;
};
TORCH_MODULE(Expert);

// The experts of one MoE layer that live on this process: global ids
// [first, first + count), registered under their global id ("experts.5.w1.weight")
// so that names are the same whatever the expert-parallel layout.
class ExpertBankImpl : public torch::nn::Module {
 public:
  ExpertBankImpl(int64_t hidden, int64_t intermediate, int64_t first, int64_t count);
  // A bank of existing experts (expert parallelism keeps a rank's share of a bank: the modules move, with
  // whatever fine-tuning attached to them).
  ExpertBankImpl(int64_t first, std::vector<Expert> experts);
  // x grouped by local expert (rows of local expert i contiguous, in order), counts per local expert.
  torch::Tensor forward(const torch::Tensor& x_grouped, const std::vector<int64_t>& counts);
  Expert& expert(int64_t global_id) { return experts_.at(global_id - first_); }
  int64_t first() const { return first_; }
  int64_t count() const { return static_cast<int64_t>(experts_.size()); }

  // LoRA on the experts, stacked per bank: lora_A[j] [count, r, in], lora_B[j] [count, out, r] for
  // j = w1, w2, w3 (registered as "w1_lora_A", ...); computed group by group on the grouped rows.
  // Undefined when the experts are not adapted.
  void set_lora(std::array<at::Tensor, 3> A, std::array<at::Tensor, 3> B, double scale,
                std::shared_ptr<LoraRuntime> rt);
  bool has_lora() const { return lora_A[0].defined() || lora_A[1].defined() || lora_A[2].defined(); }
  std::array<at::Tensor, 3> lora_A, lora_B;
  double lora_scale = 0;
  std::shared_ptr<LoraRuntime> lora_rt;

 private:
  int64_t first_;
  std::vector<Expert> experts_;
};
TORCH_MODULE(ExpertBank);

}  // namespace moeforge
