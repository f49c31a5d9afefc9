#include "model/decoder.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include "core/error.h"
#include "model/mixed.h"
#include "model/rope.h"

namespace moeforge {

DecoderLayerImpl::DecoderLayerImpl(const ModelConfig& cfg, ExpertRange held) {
  self_attn = register_module("self_attn", Attention(cfg));
  block_sparse_moe = register_module("block_sparse_moe", MoEBlock(cfg, held));
  input_layernorm = register_module("input_layernorm", RMSNorm(cfg.hidden_size, cfg.rms_norm_eps));
  post_attention_layernorm = register_module("post_attention_layernorm", RMSNorm(cfg.hidden_size, cfg.rms_norm_eps));
}

torch::Tensor DecoderLayerImpl::forward_once(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                                             const torch::Tensor& mask, RouterOutput* router_out) {
  auto h = x + self_attn->forward(input_layernorm->forward(x, compute_dtype), cos, sin, mask);
  MoEOutput moe = block_sparse_moe->forward(post_attention_layernorm->forward(h), compute_dtype);
  if (router_out) *router_out = std::move(moe.router);
  return h + moe.y;
}

torch::Tensor DecoderLayerImpl::forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                                        const torch::Tensor& mask, RouterOutput* router_out) {
  if (recompute == Recompute::None || !torch::GradMode::is_enabled()) return forward_once(x, cos, sin, mask, router_out);
  // The router decision of the first run is the one that counts (loads, entropy, the aux loss's top-k): the
  // recomputation repeats it (same inputs, same jitter draws) but its statistics are not recorded again.
  // Only the logits leave the recomputed piece with a gradient, beside its output.
  auto first = std::make_shared<RouterOutput>();
  auto recorded = std::make_shared<bool>(false);
  auto keep_first = [first, recorded](RouterOutput& r) {
    if (*recorded) return;
    *first = r;
    *recorded = true;
  };
  std::vector<at::Generator> gens;
  auto& gate = block_sparse_moe->gate;
  if (gate->is_training() && gate->jitter > 0) gens.push_back(gate->jitter_generator());
  // LoRA dropout draws from the adapters' generator: put back for the recomputation too (same masks).
  const auto& lrt = self_attn->lora_rt;
  if (lrt && lrt->enabled && lrt->dropout > 0 && is_training()) gens.push_back(lrt->gen);
  std::vector<at::Tensor> out;
  torch::Tensor h;
  if (recompute == Recompute::Full) {
    out = run_recomputed(
        [this, cos, sin, mask, keep_first](const std::vector<at::Tensor>& in) {
          RouterOutput r;
          auto y = forward_once(in[0], cos, sin, mask, &r);
          keep_first(r);
          return std::vector<at::Tensor>{y, r.logits_NE};
        },
        {x}, gens);
  } else {
    h = x + self_attn->forward(input_layernorm->forward(x, compute_dtype), cos, sin, mask);
    out = run_recomputed(
        [this, keep_first](const std::vector<at::Tensor>& in) {
          MoEOutput m = block_sparse_moe->forward(post_attention_layernorm->forward(in[0]), compute_dtype);
          keep_first(m.router);
          return std::vector<at::Tensor>{m.y, m.router.logits_NE};
        },
        {h}, gens);
  }
  if (router_out) {
    *router_out = *first;
    router_out->logits_NE = out[1];
  }
  return recompute == Recompute::Full ? out[0] : h + out[0];
}

torch::Tensor DecoderLayerImpl::forward_cached(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                                               const torch::Tensor& pos_new, std::optional<int64_t> window,
                                               LayerKVCache& cache) {
  auto h = x + self_attn->forward_cached(input_layernorm->forward(x, compute_dtype), cos, sin, pos_new, window, cache);
  return h + block_sparse_moe->forward(post_attention_layernorm->forward(h), compute_dtype).y;
}

MixtralModelImpl::MixtralModelImpl(const ModelConfig& cfg, const OnLayerBuilt& on_layer, ExpertRange held) {
  embed_tokens = register_module("embed_tokens", torch::nn::Embedding(cfg.vocab_size, cfg.hidden_size));
  auto list = torch::nn::ModuleList();
  for (int64_t i = 0; i < cfg.num_layers; ++i) {
    layers.push_back(DecoderLayer(cfg, held));
    list->push_back(layers.back());
    if (on_layer) on_layer(i, *layers.back());
  }
  register_module("layers", list);
  norm = register_module("norm", RMSNorm(cfg.hidden_size, cfg.rms_norm_eps));
}

MixtralForCausalLMImpl::MixtralForCausalLMImpl(const ModelConfig& cfg, const OnLayerBuilt& on_layer, ExpertRange held)
    : cfg_(cfg) {
  model = register_module("model", MixtralModel(cfg, on_layer, held));
  if (!cfg.tie_word_embeddings) {
    lm_head = register_module(
        "lm_head", torch::nn::Linear(torch::nn::LinearOptions(cfg.hidden_size, cfg.vocab_size).bias(false)));
  }
}

torch::Tensor MixtralForCausalLMImpl::lm_head_weight() const {
  return cfg_.tie_word_embeddings ? model->embed_tokens->weight : lm_head->weight;
}

std::vector<MoEBlock> MixtralForCausalLMImpl::moe_blocks() const {
  std::vector<MoEBlock> out;
  for (const auto& l : model->layers) out.push_back(l->block_sparse_moe);
  return out;
}

ExpertRange MixtralForCausalLMImpl::held_experts() const {
  if (model->layers.empty()) return {};
  const auto& bank = model->layers.front()->block_sparse_moe->experts;
  if (bank->count() >= cfg_.moe.num_experts) return {};
  return {bank->first(), bank->count()};
}

void MixtralForCausalLMImpl::set_compute_dtype(std::optional<at::ScalarType> dtype) {
  compute_dtype_ = dtype;
  for (auto& l : model->layers) l->compute_dtype = dtype;
}

void MixtralForCausalLMImpl::set_recompute(Recompute r) {
  for (auto& l : model->layers) l->recompute = r;
}

void MixtralForCausalLMImpl::seed_router_jitter(uint64_t seed) {
  uint64_t layer = 0;
  for (auto& b : moe_blocks()) b->gate->seed_jitter(seed * 1000003ULL + 7919ULL * ++layer);
}

namespace {
std::vector<at::Generator> random_streams(MixtralForCausalLMImpl& m) {
  std::vector<at::Generator> g;
  for (auto& b : m.moe_blocks()) g.push_back(b->gate->jitter_generator());
  if (m.lora_rt && m.lora_rt->gen.defined()) g.push_back(m.lora_rt->gen);
  return g;
}
}  // namespace

std::vector<at::Tensor> MixtralForCausalLMImpl::random_state() {
  std::vector<at::Tensor> s;
  for (auto& g : random_streams(*this)) s.push_back(g.get_state());
  return s;
}

void MixtralForCausalLMImpl::set_random_state(const std::vector<at::Tensor>& states) {
  auto g = random_streams(*this);
  MF_CHECK(g.size() == states.size(), "one state per random stream");
  for (size_t i = 0; i < g.size(); ++i) g[i].set_state(states[i]);
}

ForwardOutput MixtralForCausalLMImpl::forward(const ForwardInputs& in) {
  MF_CHECK(in.input_ids.dim() == 2, "input_ids must be [B, T]");
  const auto B = in.input_ids.size(0), T = in.input_ids.size(1);
  auto device = in.input_ids.device();
  auto x = model->embed_tokens->forward(in.input_ids);  // the residual stream stays in the parameters' dtype
  torch::Tensor pos = in.position_ids;
  if (!pos.defined()) pos = torch::arange(T, torch::TensorOptions().dtype(torch::kLong).device(device)).expand({B, T});
  auto cs = rope_cos_sin(pos, cfg_.resolved_head_dim(), cfg_.rope_theta, compute_dtype_.value_or(x.scalar_type()));
  auto mask = build_attention_mask(B, T, cfg_.sliding_window, in.segment_ids, device);
  ForwardOutput out;
  out.router.resize(model->layers.size());
  for (size_t i = 0; i < model->layers.size(); ++i) {
    x = model->layers[i]->forward(x, cs.first, cs.second, mask, &out.router[i]);
  }
  out.hidden = model->norm->forward(x, compute_dtype_);
  if (!in.skip_logits)
    out.logits = adapted_linear(out.hidden, lm_head_weight(), &lm_head_extras, lora_rt.get(), is_training());
  return out;
}

KVCache MixtralForCausalLMImpl::make_cache(int64_t batch, int64_t max_len) const {
  KVCache c;
  c.window = cfg_.sliding_window;
  c.capacity = cfg_.sliding_window ? std::min(*cfg_.sliding_window, max_len) : max_len;
  auto w = model->embed_tokens->weight;
  auto opts = w.options().dtype(compute_dtype_.value_or(w.scalar_type()));
  for (size_t i = 0; i < model->layers.size(); ++i) {
    LayerKVCache l;
    l.k = torch::zeros({batch, cfg_.num_key_value_heads, c.capacity, cfg_.resolved_head_dim()}, opts);
    l.v = torch::zeros_like(l.k);
    l.pos = torch::full({c.capacity}, -1, opts.dtype(torch::kLong));
    c.layers.push_back(l);
  }
  return c;
}

torch::Tensor MixtralForCausalLMImpl::forward_cached(const torch::Tensor& input_ids, KVCache& cache) {
  MF_CHECK(input_ids.dim() == 2, "input_ids must be [B, n]");
  const auto B = input_ids.size(0), n = input_ids.size(1);
  if (!cache.window && cache.next_pos + n > cache.capacity)
    throw UserError("generation: the sequence would exceed the cache of " + std::to_string(cache.capacity) + " tokens");
  auto x = model->embed_tokens->forward(input_ids);
  auto pos = torch::arange(cache.next_pos, cache.next_pos + n, input_ids.options().dtype(torch::kLong));
  auto cs = rope_cos_sin(pos.unsqueeze(0).expand({B, n}), cfg_.resolved_head_dim(), cfg_.rope_theta,
                         compute_dtype_.value_or(x.scalar_type()));
  for (size_t i = 0; i < model->layers.size(); ++i) {
    x = model->layers[i]->forward_cached(x, cs.first, cs.second, pos, cfg_.sliding_window, cache.layers[i]);
  }
  cache.next_pos += n;
  return adapted_linear(model->norm->forward(x, compute_dtype_), lm_head_weight(), &lm_head_extras, lora_rt.get(),
                        is_training());
}

uint64_t param_seed(uint64_t seed, const std::string& name) {
  uint64_t h = 1469598103934665603ULL;  // FNV-1a of the name
  for (unsigned char c : name) h = (h ^ c) * 1099511628211ULL;
  uint64_t z = seed + 0x9E3779B97F4A7C15ULL * (h | 1);  // splitmix64 finaliser of seed and name
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

void init_weights(torch::nn::Module& module, double init_std, uint64_t seed,
                  const std::function<bool(const std::string&)>& only) {
  torch::NoGradGuard ng;
  for (auto& p : module.named_parameters(/*recurse=*/true)) {
    const std::string& name = p.key();
    if (only && !only(name)) continue;
    torch::Tensor& t = p.value();
    auto gen = at::detail::createCPUGenerator(param_seed(seed, name));
    const bool is_norm = name.size() >= 11 && (name.find("norm.weight") != std::string::npos);
    if (is_norm) {
      t.fill_(1.0);
    } else if (t.device().is_cpu() && t.scalar_type() == torch::kFloat && t.is_contiguous()) {
      t.normal_(0.0, init_std, gen);  // in place: the same draws as into a fresh fp32 tensor, no copy
    } else {
      auto v = torch::empty(t.sizes(), torch::kFloat);
      v.normal_(0.0, init_std, gen);
      t.copy_(v.to(t.device()).to(t.scalar_type()));
    }
  }
  for (auto& b : module.named_buffers(/*recurse=*/true)) {
    if (b.key().find("expert_bias") != std::string::npos) b.value().zero_();
  }
}

}  // namespace moeforge
