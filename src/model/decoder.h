// The Mixtral decoder: embedding, N pre-norm blocks (attention + sparse MoE), final norm,
// lm_head (optionally tied). Module names equal Hugging Face MixtralForCausalLM's, so
// named_parameters() gives e.g. "model.layers.3.block_sparse_moe.experts.5.w2.weight".
#pragma once
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>

#include <functional>
#include <memory>
#include <vector>

#include "model/attention.h"
#include "model/config.h"
#include "model/moe_block.h"
#include "model/recompute.h"
#include "model/rms_norm.h"

namespace moeforge {

struct ForwardInputs {
  torch::Tensor input_ids;     // [B, T] int64
  torch::Tensor position_ids;  // [B, T], optional (default 0..T-1; restarts per packed example)
  torch::Tensor segment_ids;   // [B, T], optional: attention stays inside equal ids (packing)
  bool skip_logits = false;    // true: out.logits stays undefined (the caller applies the head to out.hidden)
};

struct ForwardOutput {
  torch::Tensor logits;              // [B, T, V]
  torch::Tensor hidden;              // [B, T, H] after the final norm
  std::vector<RouterOutput> router;  // one per layer, N = B*T rows each
};

class DecoderLayerImpl : public torch::nn::Module {
 public:
  explicit DecoderLayerImpl(const ModelConfig& cfg, ExpertRange held = {});
  // Returns the block output; the router decision goes to `router_out`.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                        const torch::Tensor& mask, RouterOutput* router_out);
  torch::Tensor forward_cached(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                               const torch::Tensor& pos_new, std::optional<int64_t> window, LayerKVCache& cache);
  // Mixed precision: the matmuls run in this dtype (the residual stream, norms and router stay fp32).
  std::optional<at::ScalarType> compute_dtype;
  // What the backward recomputes instead of keeping (training with grad enabled only).
  Recompute recompute = Recompute::None;
  RMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
  Attention self_attn{nullptr};
  MoEBlock block_sparse_moe{nullptr};

 private:
  torch::Tensor forward_once(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                             const torch::Tensor& mask, RouterOutput* router_out);
};
TORCH_MODULE(DecoderLayer);

// Called as each decoder layer is built (e.g. to load and quantise it before the next one exists).
using OnLayerBuilt = std::function<void(int64_t layer, DecoderLayerImpl& built)>;

class MixtralModelImpl : public torch::nn::Module {
 public:
  explicit MixtralModelImpl(const ModelConfig& cfg, const OnLayerBuilt& on_layer = {}, ExpertRange held = {});
  torch::nn::Embedding embed_tokens{nullptr};
  std::vector<DecoderLayer> layers;
  RMSNorm norm{nullptr};
};
TORCH_MODULE(MixtralModel);

class MixtralForCausalLMImpl : public torch::nn::Module {
 public:
  // `held`: the experts of every layer this process builds (all by default; expert parallelism builds a
  // rank's share only, and names them by global id, so the parameter names do not depend on the layout).
  explicit MixtralForCausalLMImpl(const ModelConfig& cfg, const OnLayerBuilt& on_layer = {}, ExpertRange held = {});
  ForwardOutput forward(const ForwardInputs& in);
  ForwardOutput forward(const torch::Tensor& input_ids) { return forward(ForwardInputs{input_ids, {}, {}}); }

  // An empty cache for `batch` sequences of up to `max_len` tokens (a rolling buffer of
  // `sliding_window` slots when the model has a window).
  KVCache make_cache(int64_t batch, int64_t max_len) const;
  // Incremental forward: input_ids [B, n] continue the sequences held in `cache`; returns logits [B, n, V].
  torch::Tensor forward_cached(const torch::Tensor& input_ids, KVCache& cache);

  // The (possibly tied) output projection weight [V, H].
  torch::Tensor lm_head_weight() const;
  // Whether the LM head is its weight alone (no adapter, not quantised), so that a caller may apply it itself.
  bool plain_lm_head() const { return !lm_head_extras.lora.A.defined() && !lm_head_extras.quant; }
  // The MoE blocks in layer order (for dispatchers and aux-free bias updates).
  std::vector<MoEBlock> moe_blocks() const;
  // The experts this model was built with (every layer the same range; all() when it holds every expert).
  ExpertRange held_experts() const;
  // Mixed precision: matmuls, attention and the LM head in `dtype` (bf16) with the parameters kept in their own
  // dtype (fp32 master weights); nullopt computes in the parameters' dtype. The residual stream, RMSNorm
  // statistics and the router (logits, softmax, top-k) stay fp32, the attention softmax computes in fp32 inside
  // its kernel; the objectives take logits to fp32 for their log-softmax (pretraining chunk by chunk).
  void set_compute_dtype(std::optional<at::ScalarType> dtype);
  std::optional<at::ScalarType> compute_dtype() const { return compute_dtype_; }
  // Activation recomputation for every decoder layer.
  void set_recompute(Recompute r);
  // Seeds every layer's router-jitter generator from the run seed (a distinct stream per layer).
  void seed_router_jitter(uint64_t seed);
  // The states of every random stream a training forward draws from (each layer's router jitter, the adapters'
  // dropout), to run forwards again with the very same draws (set_random_state puts them back).
  std::vector<at::Tensor> random_state();
  void set_random_state(const std::vector<at::Tensor>& states);

  const ModelConfig& config() const { return cfg_; }
  // Fine-tuning with adapters (model/finetune.h): their shared switch and dropout stream; null without.
  std::shared_ptr<LoraRuntime> lora_rt;
  LinearExtras lm_head_extras;  // an adapter on the LM head (target "lm_head")
  MixtralModel model{nullptr};
  torch::nn::Linear lm_head{nullptr};  // null when tie_word_embeddings

 private:
  ModelConfig cfg_;
  std::optional<at::ScalarType> compute_dtype_;
  torch::nn::ModuleList layer_list_{nullptr};
};
TORCH_MODULE(MixtralForCausalLM);

// Puts a model in eval mode for a scope and restores the mode it found.
class EvalModeGuard {
 public:
  explicit EvalModeGuard(MixtralForCausalLM& m) : m_(m), was_training_(m->is_training()) { m_->eval(); }
  ~EvalModeGuard() { m_->train(was_training_); }
  EvalModeGuard(const EvalModeGuard&) = delete;
  EvalModeGuard& operator=(const EvalModeGuard&) = delete;

 private:
  MixtralForCausalLM& m_;
  bool was_training_;
};

// Deterministic initialisation from a seed (independent of the global RNG and of the device):
// linear and embedding weights ~ N(0, init_std), norm weights 1, expert biases 0. Each parameter draws from
// its own stream, seeded by the seed and its name, so a process holding a share of the experts gets the very
// values the one-process model has for them (same seed, same weights in every layout).
// `only`: initialise just the parameters it accepts (by name; a model written one expert share at a time
// initialises the dense part once).
void init_weights(torch::nn::Module& model, double init_std, uint64_t seed,
                  const std::function<bool(const std::string&)>& only = {});
// The seed of parameter `name`'s stream.
uint64_t param_seed(uint64_t seed, const std::string& name);

}  // namespace moeforge
