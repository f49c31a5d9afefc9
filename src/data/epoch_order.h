// The seeded order in which a fine-tuning stage visits its examples, one permutation per epoch.
#pragma once
#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

namespace moeforge::data {

// A permutation of 0..n-1 for `epoch` of a run seeded with `seed`: Fisher-Yates driven by
// mt19937_64(seed * 1000003 + epoch), so any epoch can be recomputed on resume without the earlier ones.
inline std::vector<size_t> epoch_order(size_t n, uint64_t seed, int64_t epoch) {
  std::vector<size_t> order(n);
  for (size_t i = 0; i < n; ++i) order[i] = i;
  std::mt19937_64 rng(seed * 1000003ULL + static_cast<uint64_t>(epoch));
  for (size_t k = n; k > 1; --k) std::swap(order[k - 1], order[rng() % k]);
  return order;
}

}  // namespace moeforge::data
