#include "data/lm_dataset.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <numeric>

#include "core/error.h"

namespace moeforge::data {

TokenStream::TokenStream(std::shared_ptr<TokenDataset> ds, bool add_bos)
    : ds_(std::move(ds)), add_bos_(add_bos), bos_(ds_->meta().bos_id), eos_(ds_->meta().eos_id) {
  for (size_t s = 0; s < ds_->num_shards(); ++s) {
    const auto& sh = ds_->shard(s);
    for (uint64_t d = 0; d < sh.num_docs(); ++d) {
      uint64_t len = sh.doc_length(d) + 1 + (add_bos_ ? 1 : 0);
      docs_.push_back(Doc{static_cast<uint32_t>(s), d, total_, len});
      total_ += len;
    }
  }
}

void TokenStream::read(uint64_t pos, uint64_t n, int64_t* out) const {
  MF_CHECK(pos + n <= total_, "stream read inside the stream");
  // First document that ends after pos.
  auto it = std::upper_bound(docs_.begin(), docs_.end(), pos,
                             [](uint64_t p, const Doc& d) { return p < d.stream_begin + d.length; });
  while (n > 0) {
    MF_CHECK(it != docs_.end(), "stream position inside a document");
    const Doc& d = *it;
    uint64_t off = pos - d.stream_begin;  // offset inside this document's stream tokens
    const auto& sh = ds_->shard(d.shard);
    const uint64_t text_len = sh.doc_length(d.doc);
    const uint64_t lead = add_bos_ ? 1 : 0;
    while (n > 0 && off < d.length) {
      if (add_bos_ && off == 0) {
        *out++ = bos_;
        ++off, ++pos, --n;
      } else if (off < lead + text_len) {
        uint64_t take = std::min<uint64_t>(n, lead + text_len - off);
        sh.copy_tokens(sh.doc_begin(d.doc) + (off - lead), take, out);
        out += take, off += take, pos += take, n -= take;
      } else {
        *out++ = eos_;
        ++off, ++pos, --n;
      }
    }
    ++it;
  }
}

LmSampler::LmSampler(std::shared_ptr<TokenStream> stream, int64_t seq_len, uint64_t seed, bool shuffle)
    : stream_(std::move(stream)), seq_len_(seq_len), seed_(seed), shuffle_(shuffle) {
  windows_ = stream_->size() > 0 ? static_cast<int64_t>((stream_->size() - 1) / static_cast<uint64_t>(seq_len)) : 0;
}

int64_t LmSampler::window_of(int64_t g) {
  const int64_t epoch = g / windows_, i = g % windows_;
  if (!shuffle_) return i;
  if (epoch != cached_epoch_) {
    perm_.resize(static_cast<size_t>(windows_));
    std::iota(perm_.begin(), perm_.end(), 0);
    std::mt19937_64 rng(seed_ * 1000003ULL + static_cast<uint64_t>(epoch));
    for (int64_t k = windows_ - 1; k > 0; --k) {
      int64_t j = static_cast<int64_t>(rng() % static_cast<uint64_t>(k + 1));
      std::swap(perm_[k], perm_[j]);
    }
    cached_epoch_ = epoch;
  }
  return perm_[i];
}

LmBatch LmSampler::batch(int64_t first, int64_t batch_size) {
  MF_CHECK(windows_ > 0, "at least one window");
  auto buf = at::empty({batch_size, seq_len_ + 1}, at::kLong);
  int64_t* p = buf.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch_size; ++b) {
    int64_t w = window_of(first + b);
    stream_->read(static_cast<uint64_t>(w * seq_len_), static_cast<uint64_t>(seq_len_ + 1), p + b * (seq_len_ + 1));
  }
  return LmBatch{buf.narrow(1, 0, seq_len_).contiguous(), buf.narrow(1, 1, seq_len_).contiguous()};
}

}  // namespace moeforge::data
