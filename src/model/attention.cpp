#include "model/attention.h"

#include <torch/torch.h>

#include "core/compat.h"
#include "model/mixed.h"
#include "model/rope.h"

namespace moeforge {

at::Tensor build_attention_mask(int64_t B, int64_t T, std::optional<int64_t> window, const at::Tensor& segment_ids_BT,
                                const at::Device& device) {
  const bool windowed = window && *window < T;
  if (!windowed && !segment_ids_BT.defined()) return {};
  auto idx = torch::arange(T, torch::TensorOptions().dtype(torch::kLong).device(device));
  auto dist = idx.unsqueeze(1) - idx.unsqueeze(0);  // query i minus key j
  auto allowed = dist.ge(0);
  if (windowed) allowed = allowed.logical_and(dist.lt(*window));
  allowed = allowed.view({1, 1, T, T});
  if (segment_ids_BT.defined()) {
    auto seg = segment_ids_BT.to(device);
    auto same = seg.unsqueeze(2).eq(seg.unsqueeze(1)).unsqueeze(1);  // [B, 1, T, T]
    allowed = allowed.logical_and(same);
  } else {
    allowed = allowed.expand({B, 1, T, T});
  }
  return allowed.contiguous();
}

AttentionImpl::AttentionImpl(const ModelConfig& cfg)
    : num_heads(cfg.num_attention_heads), num_kv_heads(cfg.num_key_value_heads), head_dim(cfg.resolved_head_dim()) {
  auto lin = [](int64_t in, int64_t out) { return torch::nn::Linear(torch::nn::LinearOptions(in, out).bias(false)); };
  q_proj = register_module("q_proj", lin(cfg.hidden_size, cfg.q_dim()));
  k_proj = register_module("k_proj", lin(cfg.hidden_size, cfg.kv_dim()));
  v_proj = register_module("v_proj", lin(cfg.hidden_size, cfg.kv_dim()));
  o_proj = register_module("o_proj", lin(cfg.q_dim(), cfg.hidden_size));
}

torch::Tensor AttentionImpl::proj(const torch::Tensor& x, const torch::nn::Linear& l, const LinearExtras& ex) {
  return adapted_linear(x, l->weight, &ex, lora_rt.get(), is_training());
}

torch::Tensor AttentionImpl::repeat_kv(const torch::Tensor& x, int64_t groups) {
  if (groups == 1) return x;
  const auto B = x.size(0), KV = x.size(1), T = x.size(2), D = x.size(3);
  return x.unsqueeze(2).expand({B, KV, groups, T, D}).reshape({B, KV * groups, T, D});
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x_BTH, const torch::Tensor& cos, const torch::Tensor& sin,
                                     const torch::Tensor& mask) {
  const auto B = x_BTH.size(0), T = x_BTH.size(1);
  auto q = proj(x_BTH, q_proj, q_extras).view({B, T, num_heads, head_dim}).transpose(1, 2);
  auto k = proj(x_BTH, k_proj, k_extras).view({B, T, num_kv_heads, head_dim}).transpose(1, 2);
  auto v = proj(x_BTH, v_proj, v_extras).view({B, T, num_kv_heads, head_dim}).transpose(1, 2);
  q = apply_rope(q, cos, sin);
  k = apply_rope(k, cos, sin);
  const int64_t groups = num_heads / num_kv_heads;
  k = repeat_kv(k, groups);
  v = repeat_kv(v, groups);
  auto out = compat::scaled_dot_product_attention(q, k, v, mask);  // [B, Nh, T, D]
  out = out.transpose(1, 2).reshape({B, T, num_heads * head_dim});
  return proj(out, o_proj, o_extras);
}

}  // namespace moeforge

namespace moeforge {

torch::Tensor AttentionImpl::forward_cached(const torch::Tensor& x_BTH, const torch::Tensor& cos,
                                            const torch::Tensor& sin, const torch::Tensor& pos_new,
                                            std::optional<int64_t> window, LayerKVCache& cache) {
  const auto B = x_BTH.size(0), n = x_BTH.size(1);
  auto q = proj(x_BTH, q_proj, q_extras).view({B, n, num_heads, head_dim}).transpose(1, 2);
  auto k = proj(x_BTH, k_proj, k_extras).view({B, n, num_kv_heads, head_dim}).transpose(1, 2);
  auto v = proj(x_BTH, v_proj, v_extras).view({B, n, num_kv_heads, head_dim}).transpose(1, 2);
  q = apply_rope(q, cos, sin);
  k = apply_rope(k, cos, sin);
  // Keys: the filled slots of the cache, then the new ones; the mask comes from absolute positions,
  // so the slot order of the rolling buffer does not matter.
  auto filled = cache.pos.ge(0).nonzero().view({-1});
  auto k_all = torch::cat({cache.k.index_select(2, filled), k}, 2);
  auto v_all = torch::cat({cache.v.index_select(2, filled), v}, 2);
  auto pos_all = torch::cat({cache.pos.index_select(0, filled), pos_new});
  auto dist = pos_new.unsqueeze(1) - pos_all.unsqueeze(0);  // [n, m + n]
  auto allowed = dist.ge(0);
  if (window) allowed = allowed.logical_and(dist.lt(*window));
  const int64_t groups = num_heads / num_kv_heads;
  auto out = compat::scaled_dot_product_attention(q, repeat_kv(k_all, groups), repeat_kv(v_all, groups),
                                                  allowed.view({1, 1, n, -1}));
  // Store the new keys/values (only the last `capacity` of them can survive).
  const int64_t cap = cache.pos.size(0);
  const int64_t first = std::max<int64_t>(0, n - cap);
  {
    torch::NoGradGuard ng;
    auto keep = torch::arange(first, n, pos_new.options());
    auto slots = pos_new.index_select(0, keep).remainder(cap);
    cache.k.index_copy_(2, slots, k.index_select(2, keep));
    cache.v.index_copy_(2, slots, v.index_select(2, keep));
    cache.pos.index_copy_(0, slots, pos_new.index_select(0, keep));
  }
  out = out.transpose(1, 2).reshape({B, n, num_heads * head_dim});
  return proj(out, o_proj, o_extras);
}

}  // namespace moeforge
