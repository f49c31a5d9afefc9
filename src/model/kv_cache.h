// Key/value cache for incremental decoding. With a sliding window the cache is a rolling buffer of
// `window` slots (as in Mistral): position p lives in slot p % window, so memory stays bounded
// however long the text. Keys are stored after RoPE, so a slot's content never needs re-rotating.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace moeforge {

struct LayerKVCache {
  at::Tensor k, v;    // [B, kv_heads, capacity, D]
  at::Tensor pos;     // [capacity] int64: absolute position held by each slot, -1 = empty
};

struct KVCache {
  std::vector<LayerKVCache> layers;
  int64_t capacity = 0;
  std::optional<int64_t> window;
  int64_t next_pos = 0;  // position of the next token to feed
};

}  // namespace moeforge
