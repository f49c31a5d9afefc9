// Token shards: the on-disk form of tokenized documents, memory-mapped for training.
//
// Layout (little-endian):  "MFTOKS01" | u32 token_bytes (2|4) | u32 0 | u64 num_tokens | u64 num_docs |
//   tokens (num_tokens * token_bytes, zero-padded to 8) | u64 doc_offsets[num_docs + 1] | u32 doc_domain[num_docs]
// A prepared data directory holds meta.json (vocabulary, split -> shard files, domain names),
// the shards and a copy of the tokenizer.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace moeforge::data {

class ShardWriter {
 public:
  ShardWriter(const std::string& path, int token_bytes);
  ~ShardWriter();
  void add_document(const std::vector<int>& tokens, uint32_t domain);
  void finish();  // writes offsets, domains and the final header; fsyncs
  uint64_t num_tokens() const { return num_tokens_; }
  uint64_t num_docs() const { return domains_.size(); }

 private:
  std::string path_;
  int token_bytes_;
  std::FILE* f_ = nullptr;
  uint64_t num_tokens_ = 0;
  std::vector<uint64_t> offsets_{0};
  std::vector<uint32_t> domains_;
};

// A read-only, memory-mapped, validated shard. Tokens are checked against `vocab_size`,
// domain ids against `num_domains`; any inconsistency is a UserError naming the file.
class TokenShard {
 public:
  TokenShard(const std::string& path, int64_t vocab_size, int64_t num_domains);
  ~TokenShard();
  TokenShard(const TokenShard&) = delete;
  TokenShard& operator=(const TokenShard&) = delete;

  uint64_t num_tokens() const { return num_tokens_; }
  uint64_t num_docs() const { return num_docs_; }
  uint64_t doc_begin(uint64_t d) const { return offsets_[d]; }
  uint64_t doc_length(uint64_t d) const { return offsets_[d + 1] - offsets_[d]; }
  uint32_t doc_domain(uint64_t d) const { return domains_[d]; }
  int64_t token(uint64_t i) const { return token_bytes_ == 2 ? tok16_[i] : tok32_[i]; }
  // Copies tokens [begin, begin + n) into out.
  void copy_tokens(uint64_t begin, uint64_t n, int64_t* out) const;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  void* map_ = nullptr;
  size_t size_ = 0;
  int token_bytes_ = 0;
  uint64_t num_tokens_ = 0, num_docs_ = 0;
  const uint16_t* tok16_ = nullptr;
  const uint32_t* tok32_ = nullptr;
  const uint64_t* offsets_ = nullptr;
  const uint32_t* domains_ = nullptr;
};

// meta.json of a prepared directory.
struct PreparedMeta {
  int64_t vocab_size = 0;
  int64_t bos_id = 1, eos_id = 2;
  int token_bytes = 2;
  std::string tokenizer;  // file name inside the directory
  std::vector<std::string> domains;
  std::vector<std::string> train_shards, val_shards;
  int64_t train_tokens = 0, val_tokens = 0, train_docs = 0, val_docs = 0;
};
PreparedMeta read_prepared_meta(const std::string& dir);
void write_prepared_meta(const std::string& dir, const PreparedMeta& m, uint64_t seed, double val_fraction);

// All shards of one split of a prepared directory.
class TokenDataset {
 public:
  TokenDataset(const std::string& dir, const std::string& split);  // split: "train" | "val"
  const PreparedMeta& meta() const { return meta_; }
  size_t num_shards() const { return shards_.size(); }
  const TokenShard& shard(size_t i) const { return *shards_[i]; }
  uint64_t num_docs() const;
  uint64_t num_tokens() const;
  const std::string& dir() const { return dir_; }

 private:
  std::string dir_;
  PreparedMeta meta_;
  std::vector<std::unique_ptr<TokenShard>> shards_;
};

}  // namespace moeforge::data
