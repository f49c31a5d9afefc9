// Parameter counts and memory estimates computed from a config alone (no weights allocated).
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "model/config.h"
#include "model/lora.h"

namespace moeforge {

struct ParamCounts {
  int64_t embedding = 0;    // model.embed_tokens
  int64_t attention = 0;    // q, k, v, o over all layers
  int64_t router = 0;       // block_sparse_moe.gate over all layers
  int64_t experts = 0;      // all experts of all layers
  int64_t per_expert = 0;   // one expert of one layer (w1, w2, w3)
  int64_t shared = 0;       // the shared experts and their gates over all layers (every token: active)
  int64_t norms = 0;        // input/post-attention norms of all layers + the final norm
  int64_t lm_head = 0;      // 0 when tied to the embedding
  int64_t total = 0;
  int64_t active = 0;       // parameters one token passes through (k experts per layer)
};

ParamCounts count_params(const ModelConfig& c);

// Every parameter of the model with its shape, by Hugging Face name, in the model's order (what
// named_parameters() lists for the whole model), from the config alone: streamed export and memory plans
// walk a model without building it.
std::vector<std::pair<std::string, std::vector<int64_t>>> parameter_shapes(const ModelConfig& c);

// Bytes for weights, gradients and AdamW state (two moments) at a given bytes-per-element.
struct MemoryEstimate {
  double weights_bf16, weights_fp32;
  double grads_bf16, grads_fp32;
  double adamw_fp32;         // m and v in fp32 (8 bytes / parameter)
  double mixed_bf16_total;   // moeforge's bf16 mixed precision: fp32 master weights + fp32 grads + fp32 m, v +
                             // the bf16 weight copies the matmuls keep until the backward (18 bytes / parameter)
  double fp32_total;         // fp32 weights + fp32 grads + fp32 m, v (16 bytes / parameter)
};
MemoryEstimate estimate_memory(const ParamCounts& p);

// Fine-tuning with adapters: what trains and what it costs, as moeforge stores it. The frozen attention and
// expert weights are bf16 (LoRA with bf16 compute: the matmuls use bf16 copies anyway), fp32 (LoRA in fp32)
// or quantised (QLoRA: codes + block absmax); embeddings, LM head, norms and router stay fp32; the adapters
// train with fp32 weights, gradients and AdamW moments (16 bytes / parameter). No activations.
struct FinetuneEstimate {
  int64_t trainable = 0;       // adapter parameters
  int64_t frozen_linear = 0;   // attention + expert weights (the quantised ones under QLoRA)
  double base_bytes = 0;       // the frozen model as stored
  double quant_overhead = 0;   // QLoRA: absmax storage beyond the codes
  double adapter_bytes = 0;    // adapter weights (fp32)
  double grad_bytes = 0;       // adapter gradients (fp32)
  double optimizer_bytes = 0;  // AdamW moments of the adapters (fp32)
  double total = 0;
};
FinetuneEstimate estimate_finetune(const ModelConfig& c, const FinetuneSpec& ft, bool bf16);

}  // namespace moeforge
