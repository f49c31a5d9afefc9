// The frozen base of a LoRA / QLoRA run. It is built layer by layer from `init_from` (a moeforge checkpoint
// or hf:DIR): each decoder layer is loaded tensor by tensor from the memory-mapped files as soon as it exists
// and, for QLoRA, quantised before the next layer is built, so the full-precision model is never resident
// at once (one layer's float weights at a time, plus the embeddings and LM head, which stay float).
// A checkpoint of an adapter run holds the adapters (and their optimizer state) and a pointer to its base:
//   base.json  {"init_from": absolute source, "fingerprint": hex of the base's values as loaded, "method"}
// Loading such a checkpoint rebuilds the base from the pointer and refuses a base whose fingerprint changed.
#pragma once
#include <cstdint>
#include <optional>
#include <string>

#include "model/decoder.h"
#include "model/lora.h"

namespace moeforge::train {

struct BaseModel {
  MixtralForCausalLM model{nullptr};
  uint64_t fingerprint = 0;  // XOR of tensor_fingerprint over every parameter loaded (before quantisation)
  uint64_t experts_fingerprint = 0;  // the experts' part of it (a rank's share XORs with the others')
};

// Builds `cfg`'s model from `init_from`, every parameter frozen. The attention and expert weights are stored
// quantised (ft.quantized(): ft.quant) or, with `precision` bf16, in bf16 (the matmuls would cast them to
// bf16 anyway, so the numbers are the same and the frozen base takes half the memory); the embeddings, LM
// head, norms and router stay fp32.
// `held`: the experts this process builds and reads (expert parallelism: the rank's share; the others are
// never read, and a fused v5 tensor is read only in this share's rows). `over_group` (required when `held` is a
// share and `init_from` is itself an adapter checkpoint, whose base fingerprint is checked) combines the ranks'.
BaseModel load_base_model(const std::string& init_from, const ModelConfig& cfg, const FinetuneSpec& ft,
                          const std::string& precision, ExpertRange held = {}, const GroupXor& over_group = {});

struct BasePointer {
  std::string init_from;
  uint64_t fingerprint = 0;
  std::string method;
};
std::string base_pointer_json(const BasePointer& b);
// A checkpoint's base.json (nullopt: a full checkpoint); unreadable: UserError naming it.
std::optional<BasePointer> read_base_pointer(const std::string& ckpt_dir);
// Whether an adapter checkpoint's run moved the routers' selection biases: finetune.lora.update_expert_bias in
// its recipe.yaml. A recipe.yaml without the key was written before the key existed, when the biases stayed the
// base's: false. No recipe.yaml, or one that is not YAML: UserError naming it.
bool checkpoint_updates_expert_bias(const std::string& ckpt_dir);

// A LoRA / QLoRA checkpoint's model (base from its pointer, checked by fingerprint, plus its adapters), on
// the CPU. The fine-tuning settings come from the checkpoint's recipe.yaml. `held`: only this share of the experts
// (and their adapters) is built and read; the base's fingerprint is then combined over the ranks by `over_group`.
// `check_base` false: the caller checks what these values become (a chained base inside an export by shares).
MixtralForCausalLM load_adapter_checkpoint_model(const std::string& ckpt_dir, const BasePointer& base,
                                                 ExpertRange held = {}, const GroupXor& over_group = {},
                                                 bool check_base = true);

}  // namespace moeforge::train
