// LoRA (Hu et al. 2021) on the frozen linear layers of the model, and what a fine-tuning method is.
// An adapted linear computes y = x W^T + scale * dropout(x) A^T B^T with W frozen (fp32, or stored
// quantised for QLoRA: model/quant.h), A [r, in] and B [out, r] trainable, B zero-initialised, scale
// alpha / r (alpha / sqrt(r) with rsLoRA, Kalajdzievski 2023). The names of the targets are Hugging Face's
// module names, so that a PEFT adapter config says the same thing as ours.
#pragma once
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <vector>

#include "model/quant.h"

namespace moeforge {

// finetune.lora
struct LoraSpec {
  int64_t rank = 16;
  double alpha = 32;
  double dropout = 0.0;  // PEFT's default; > 0 draws a mask per adapted input (a serial RNG on Debian's LibTorch)
  // Attention and experts; the router stays frozen by default (see the README: a router that moves while
  // the experts are adapted re-routes tokens away from the experts being tuned).
  std::vector<std::string> targets{"q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"};
  int64_t expert_rank = 0;  // the experts' rank; 0 = rank
  bool rslora = false;
  // Under model.moe.balance: aux_free_bias, the routers' selection biases go on balancing the experts' load
  // while the adapters train (they are buffers of a few floats per layer, saved with the adapters), as they do
  // in full fine-tuning; false keeps them as the base has them. DPO with the adapters_off reference keeps them
  // (that reference routes with them too): the recipe resolves an unset key to false there.
  bool update_expert_bias = true;

  bool targets_module(const std::string& name) const;
  // The rank and the scale of a target ("w1" is an expert target).
  int64_t rank_of(const std::string& target) const;
  double scale_of(const std::string& target) const;
};

// The module names `all` stands for (every linear layer of the decoder blocks, as PEFT's all-linear).
const std::vector<std::string>& lora_target_names();
// Those and `lm_head` (the output projection, not in `all`, as in PEFT).
bool is_lora_target(const std::string& t);
bool is_expert_target(const std::string& target);
// Every name checked (UserError "<where>: key 'finetune.lora.targets': ..."); "all" expands to every name.
std::vector<std::string> resolve_lora_targets(const std::vector<std::string>& given, const std::string& where);

// finetune: full fine-tuning (every parameter trains), LoRA on a frozen base, or QLoRA (LoRA on a base whose
// targeted linear weights are stored quantised).
struct FinetuneSpec {
  std::string method = "full";  // full | lora | qlora
  LoraSpec lora;
  QuantSpec quant;
  bool adapters() const { return method == "lora" || method == "qlora"; }
  bool quantized() const { return method == "qlora"; }
};

// Shared by every adapted layer of one model: whether the adapters take part (DPO's adapters_off
// reference switches them off) and the dropout generator (its own stream, saved in checkpoints).
struct LoraRuntime {
  bool enabled = true;
  double dropout = 0;
  at::Generator gen;
};

// One adapter: A [r, in], B [out, r] (or one expert's slices of a stacked bank).
struct LoraAdapter {
  at::Tensor A, B;
  double scale = 0;
  bool defined() const { return A.defined(); }
};

// What fine-tuning attaches to one base linear layer.
struct LinearExtras {
  LoraAdapter lora;                              // none when lora.A is undefined
  std::shared_ptr<const QuantizedWeight> quant;  // set: the base weight lives here, quantised
};

// x W^T in x's dtype, W from `w` or from `extras->quant`; plus the adapter's term when it has one and
// `rt` enables it (dropout on the adapter's input when training).
at::Tensor adapted_linear(const at::Tensor& x, const at::Tensor& w, const LinearExtras* extras, const LoraRuntime* rt,
                          bool training);

// A and B in `dtype` with the scale folded into B (scale 1): two small casts instead of a cast per use and
// a multiply over every output row. The casts are in the graph, so the fp32 A and B get the gradients.
LoraAdapter folded(const LoraAdapter& a, at::ScalarType dtype);

// y + dropout(x) A^T B^T for a folded adapter, the addition fused into the second matmul (addmm).
at::Tensor add_lora(const at::Tensor& y, const at::Tensor& x, const LoraAdapter& folded, const LoraRuntime& rt,
                    bool training);

}  // namespace moeforge
