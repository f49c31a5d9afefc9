// The memory of one training rank, predicted from the recipe alone (moeforge plan): what each rank holds under
// expert parallelism (the dense parameters and num_experts / EP experts of every layer), its gradients, AdamW
// state (ZeRO-1: split over the ranks holding a copy), adapters and quantisation, a DPO reference, and the
// activations of one micro-batch as moeforge's autograd graph keeps them (bytes per token and layer, counted
// tensor by tensor from the model code, with and without recomputation), plus the logits and the runtime
// (LibTorch, OpenMP/BLAS, allocator arenas; on CPU a constant measured apart from the checks: a one-step,
// 16-token run of configs/tiny.yaml peaks at 259 MiB VmHWM, of which 76 MiB are its model state). Checked
// against measured peaks (scripts/bench_plan.sh).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/lora.h"

namespace moeforge {

struct PlanInput {
  ModelConfig model;
  FinetuneSpec finetune;
  std::string precision = "bf16";         // fp32 | bf16
  std::string stage = "pretrain";         // pretrain | sft | dpo
  std::string dpo_reference = "auto";     // frozen | precompute | adapters_off | auto
  int64_t micro_batch = 1, seq_len = 128;
  std::string recompute = "none";         // none | moe | full
  int world = 1, expert = 1;              // processes, parallel.expert
  bool zero = false;                      // parallel.zero: 1
  // Under expert parallelism, the routed rows the busiest rank receives over the mean (routing is rarely
  // balanced, least at the start: the quickstart's loads reach 3-4x the fair share per expert). The plan is
  // the busiest rank's.
  double expert_load = 1.5;
  std::string device = "cpu";             // cpu | cuda: the runtime's fixed cost differs
};

struct RankPlan {
  int64_t params_held = 0;     // parameters this rank holds (dense + its experts)
  int64_t trainable = 0;       // of which train (full: all; adapters: the adapters)
  double weights = 0;          // as stored: fp32 master / bf16 / quantised codes
  double quant_overhead = 0;   // QLoRA: block absmax beyond the codes (included in weights)
  double compute_copies = 0;   // bf16 copies of fp32 weights kept from the forward to the backward
  double gradients = 0;
  double optimizer = 0;        // AdamW m and v
  double adapters = 0;         // adapter weights (fp32)
  double reference = 0;        // DPO frozen reference (sharded like the policy)
  double activations = 0;      // decoder layers, one micro-batch, at the backward's start
  double backward = 0;         // the gradients in flight while one layer is differentiated (one layer's worth)
  double logits = 0;           // logits, their fp32 log-softmax and its gradient
  double runtime = 0;          // the process itself
  double total = 0;
};

// UserError if expert does not divide world or num_experts.
RankPlan plan_rank(const PlanInput& in);

struct PlanAdvice {
  bool fits = true;
  std::string suggestion;  // empty when it fits
};
// Whether `in` fits `device_bytes` per rank, and if not the first of: more expert parallelism (within the world
// and num_experts), ZeRO-1, recomputation, LoRA, QLoRA, smaller micro-batches, more GPUs.
PlanAdvice advise(const PlanInput& in, double device_bytes);

}  // namespace moeforge
