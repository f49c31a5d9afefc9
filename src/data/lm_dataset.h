// Language-model samples from a prepared split: documents laid end to end as
// <s> doc </s> <s> doc </s> ..., cut into windows of seq_len + 1 tokens at stride seq_len.
// Order: a seeded permutation of the windows per epoch, so a sample is a pure function of
// (seed, global sample index) and resuming needs only the index.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <random>
#include <vector>

#include "data/token_shard.h"

namespace moeforge::data {

class TokenStream {
 public:
  explicit TokenStream(std::shared_ptr<TokenDataset> ds, bool add_bos = true);
  uint64_t size() const { return total_; }
  // Copies stream positions [pos, pos + n) into out.
  void read(uint64_t pos, uint64_t n, int64_t* out) const;
  const TokenDataset& dataset() const { return *ds_; }

 private:
  std::shared_ptr<TokenDataset> ds_;
  bool add_bos_;
  int64_t bos_, eos_;
  struct Doc {
    uint32_t shard;
    uint64_t doc;
    uint64_t stream_begin;  // where this document's first stream token (<s> or text) sits
    uint64_t length;        // stream tokens incl. <s> and </s>
  };
  std::vector<Doc> docs_;
  uint64_t total_ = 0;
};

struct LmBatch {
  at::Tensor inputs;   // [B, T] int64
  at::Tensor targets;  // [B, T] int64
};

class LmSampler {
 public:
  LmSampler(std::shared_ptr<TokenStream> stream, int64_t seq_len, uint64_t seed, bool shuffle);
  int64_t num_windows() const { return windows_; }
  // Samples [first, first + batch) of the global order.
  LmBatch batch(int64_t first, int64_t batch_size);

 private:
  int64_t window_of(int64_t global_index);
  std::shared_ptr<TokenStream> stream_;
  int64_t seq_len_, windows_;
  uint64_t seed_;
  bool shuffle_;
  int64_t cached_epoch_ = -1;
  std::vector<int64_t> perm_;
};

}  // namespace moeforge::data
