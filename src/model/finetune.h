// Fine-tuning on a built model: freezing the base, attaching LoRA adapters, storing base weights quantised
// (QLoRA), switching the adapters off (DPO's reference), and the model's weights seen from outside:
// adapters under per-expert names, the merged model for export.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "model/decoder.h"
#include "model/lora.h"

namespace moeforge {

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

// Every parameter stops taking gradients.
void freeze_base(MixtralForCausalLM& m);

// Attaches adapters to the targets of `s` in every layer, after expert parallelism has cut the banks (a
// bank's stacked adapters cover its own experts). A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's Kaiming-uniform
// bound), drawn per adapter (per expert) from a generator seeded by `seed` and the adapter's name, so every
// layout draws the same values; B = 0, so the adapted model starts equal to the base. The dropout stream is
// seeded from `seed` too.
void attach_lora(MixtralForCausalLM& m, const LoraSpec& s, uint64_t seed);

// QLoRA: the weights of every attention projection and expert (q, k, v, o, w1, w2, w3; the router,
// embeddings, norms and LM head stay as they are) of one layer stored quantised, their float storage freed.
void quantize_layer(DecoderLayerImpl& layer, const QuantSpec& q);
void quantize_base(MixtralForCausalLM& m, const QuantSpec& q);
// LoRA with bf16 compute: the same weights (q, k, v, o, w1, w2, w3) kept in `dtype` instead.
void store_linear_weights(DecoderLayerImpl& layer, at::ScalarType dtype);
// Bytes of the quantised storage of the model.
int64_t quantized_bytes(MixtralForCausalLM& m);
// model->to(device) does not know the quantised weights: this moves them too.
void move_to(MixtralForCausalLM& m, const at::Device& d);

// DPO's adapters_off reference: the same network without its adapters, for a scope.
class AdaptersOffGuard {
 public:
  explicit AdaptersOffGuard(MixtralForCausalLM& m);
  ~AdaptersOffGuard();
  AdaptersOffGuard(const AdaptersOffGuard&) = delete;
  AdaptersOffGuard& operator=(const AdaptersOffGuard&) = delete;

 private:
  MixtralForCausalLM& m_;
  bool was_ = false;
};

bool has_adapters(const MixtralForCausalLM& m);

// The adapters by layout-independent name: PEFT's key names without "base_model.model." (e.g.
// "model.layers.0.self_attn.q_proj.lora_A.weight", "model.layers.0.block_sparse_moe.experts.3.w1.lora_B.weight").
// Expert adapters are views into their bank's stacked tensors, so copying into them loads.
NamedTensors adapter_tensors(MixtralForCausalLM& m);

// A stacked expert adapter parameter and the experts its rows are.
struct StackedAdapter {
  std::string param;      // its parameter name ("model.layers.0.block_sparse_moe.experts.w1_lora_A")
  std::string layer;      // "model.layers.0."
  std::string proj, ab;   // "w1", "A"
  int64_t first = 0, count = 0;
  // The name of row i (expert first + i) among adapter_tensors().
  std::string row_name(int64_t i) const;
};
std::vector<StackedAdapter> stacked_adapters(MixtralForCausalLM& m);

// The model's weights under Hugging Face names with the adapters merged in (W + scale * B A, a quantised W
// dequantised first), in fp32, for export. Without adapters: the parameters themselves.
NamedTensors merged_weights(MixtralForCausalLM& m);

// A 64-bit fingerprint of a named tensor's values (its fp32 bytes); XOR them to fingerprint a model
// (order-free, so a layer-by-layer load and a whole-model pass agree).
uint64_t tensor_fingerprint(const std::string& name, const at::Tensor& t);

}  // namespace moeforge
