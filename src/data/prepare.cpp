#include "data/prepare.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <numeric>
#include <random>

#include "core/error.h"
#include "data/text_source.h"
#include "data/token_shard.h"
#include "data/tokenizer.h"

namespace moeforge::data {

namespace fs = std::filesystem;

std::vector<bool> choose_validation(int64_t n, double fraction, uint64_t seed) {
  std::vector<bool> val(static_cast<size_t>(n), false);
  if (n < 2 || fraction <= 0) return val;
  int64_t k = std::llround(fraction * static_cast<double>(n));
  k = std::clamp<int64_t>(k, 1, n - 1);
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 rng(seed);
  for (int64_t i = n - 1; i > 0; --i) {  // Fisher-Yates with our own draw: same on every libstdc++
    int64_t j = static_cast<int64_t>(rng() % static_cast<uint64_t>(i + 1));
    std::swap(order[i], order[j]);
  }
  for (int64_t i = 0; i < k; ++i) val[order[i]] = true;
  return val;
}

namespace {

struct SplitWriter {
  std::string dir, split;
  int token_bytes;
  uint64_t max_tokens;
  std::vector<std::string> names;
  std::unique_ptr<ShardWriter> cur;
  int64_t tokens = 0, docs = 0;

  void add(const std::vector<int>& t, uint32_t domain) {
    if (!cur || (cur->num_tokens() > 0 && cur->num_tokens() + t.size() > max_tokens)) roll();
    cur->add_document(t, domain);
    tokens += static_cast<int64_t>(t.size());
    ++docs;
  }
  void roll() {
    if (cur) cur->finish();
    char name[64];
    std::snprintf(name, sizeof name, "%s-%05zu.bin", split.c_str(), names.size());
    names.push_back(name);
    cur = std::make_unique<ShardWriter>(dir + "/" + name, token_bytes);
  }
  void finish() {
    if (!cur) roll();  // an empty split still has one (empty) shard
    cur->finish();
  }
};

void progress_line(bool tty, int64_t done, int64_t total, int64_t tokens, bool final) {
  if (!final && (done == total || (!tty && done % std::max<int64_t>(1, total / 4) != 0))) return;
  const int width = 30;
  int filled = total > 0 ? static_cast<int>(width * done / total) : width;
  std::fprintf(stderr, "%sprepare: [%s%s] %ld/%ld documents, %ld tokens%s", tty ? "\r" : "",
               std::string(filled, '#').c_str(), std::string(width - filled, ' ').c_str(), (long)done, (long)total,
               (long)tokens, (tty && !final) ? "" : "\n");
  std::fflush(stderr);
}

}  // namespace

PrepareResult prepare_corpus(const PrepareOptions& options) {
  PrepareOptions opt = options;
  while (opt.out_dir.size() > 1 && opt.out_dir.back() == '/') opt.out_dir.pop_back();
  if (opt.out_dir.empty()) throw UserError("prepare: --out is required");
  if (opt.val_fraction < 0 || opt.val_fraction >= 1)
    throw UserError("prepare: --val-fraction must be in [0, 1), got " + std::to_string(opt.val_fraction));
  if (!opt.overwrite && fs::exists(opt.out_dir) && !fs::is_empty(opt.out_dir))
    throw UserError(opt.out_dir + ": already exists; choose another --out or pass --overwrite");
  Tokenizer tok(opt.tokenizer);
  auto files = expand_inputs(opt.inputs);
  TextSourceOptions src;
  src.domain_field = opt.domain_field;
  src.split_blank_lines = opt.split_blank_lines;

  int64_t n = 0;
  for_each_document(files, src, [&](const Document&) { ++n; });
  if (n == 0) throw UserError("prepare: the inputs contain no documents (empty corpus)");
  auto is_val = choose_validation(n, opt.val_fraction, opt.seed);

  const std::string tmp = opt.out_dir + ".tmp-" + std::to_string(::getpid());
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  PreparedMeta meta;
  meta.vocab_size = tok.vocab_size();
  meta.bos_id = tok.bos_id();
  meta.eos_id = tok.eos_id();
  meta.token_bytes = meta.vocab_size <= 65536 ? 2 : 4;
  meta.tokenizer = "tokenizer.model";
  SplitWriter train{tmp, "train", meta.token_bytes, opt.max_shard_tokens, {}, nullptr};
  SplitWriter val{tmp, "val", meta.token_bytes, opt.max_shard_tokens, {}, nullptr};
  std::map<std::string, uint32_t> domain_ids;
  const bool tty = opt.progress && ::isatty(2);
  int64_t i = 0, all_tokens = 0;
  try {
    for_each_document(files, src, [&](const Document& d) {
      auto it = domain_ids.find(d.domain);
      if (it == domain_ids.end()) {
        it = domain_ids.emplace(d.domain, static_cast<uint32_t>(meta.domains.size())).first;
        meta.domains.push_back(d.domain);
      }
      auto ids = tok.encode(d.text);
      (is_val[i] ? val : train).add(ids, it->second);
      all_tokens += static_cast<int64_t>(ids.size());
      ++i;
      if (opt.progress) progress_line(tty, i, n, all_tokens, false);
    });
    train.finish();
    val.finish();
    fs::copy_file(opt.tokenizer, tmp + "/tokenizer.model", fs::copy_options::overwrite_existing);
  } catch (...) {
    fs::remove_all(tmp);
    throw;
  }
  meta.train_shards = train.names;
  meta.val_shards = val.names;
  meta.train_tokens = train.tokens;
  meta.val_tokens = val.tokens;
  meta.train_docs = train.docs;
  meta.val_docs = val.docs;
  write_prepared_meta(tmp, meta, opt.seed, opt.val_fraction);
  if (opt.progress) progress_line(tty, n, n, all_tokens, true);

  // Swap into place: the old directory is removed only after the new one is complete.
  if (fs::exists(opt.out_dir)) {
    const std::string old = opt.out_dir + ".old-" + std::to_string(::getpid());
    fs::rename(opt.out_dir, old);
    fs::rename(tmp, opt.out_dir);
    fs::remove_all(old);
  } else {
    if (fs::path(opt.out_dir).has_parent_path()) fs::create_directories(fs::path(opt.out_dir).parent_path());
    fs::rename(tmp, opt.out_dir);
  }
  PrepareResult r;
  r.train_docs = train.docs;
  r.val_docs = val.docs;
  r.train_tokens = train.tokens;
  r.val_tokens = val.tokens;
  r.domains = meta.domains;
  return r;
}

}  // namespace moeforge::data
