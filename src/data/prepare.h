// moeforge prepare: text / JSONL -> token shards (train and validation, split by document).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace moeforge::data {

struct PrepareOptions {
  std::string tokenizer;            // SentencePiece .model
  std::vector<std::string> inputs;  // files, directories or globs
  std::string out_dir;
  double val_fraction = 0.05;
  uint64_t seed = 1234;
  std::string domain_field = "domain";  // JSONL metadata field kept per document
  bool split_blank_lines = false;
  bool overwrite = false;
  uint64_t max_shard_tokens = 256ull << 20;
  bool progress = true;
};

struct PrepareResult {
  int64_t train_docs = 0, val_docs = 0, train_tokens = 0, val_tokens = 0;
  std::vector<std::string> domains;
};

PrepareResult prepare_corpus(const PrepareOptions& opt);

// Which of n documents go to validation: round(fraction * n) of them (at least one when
// fraction > 0 and n >= 2, never all), chosen by a seeded shuffle. Returns a flag per document.
std::vector<bool> choose_validation(int64_t n, double fraction, uint64_t seed);

}  // namespace moeforge::data
