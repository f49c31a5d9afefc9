#include "data/token_shard.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"

namespace moeforge::data {

namespace fs = std::filesystem;
namespace {
constexpr char kMagic[8] = {'M', 'F', 'T', 'O', 'K', 'S', '0', '1'};
constexpr size_t kHeader = 32;

void write_all(std::FILE* f, const void* p, size_t n, const std::string& path) {
  if (n && std::fwrite(p, 1, n, f) != n) throw UserError(path + ": write failed: " + std::strerror(errno));
}
}  // namespace

ShardWriter::ShardWriter(const std::string& path, int token_bytes) : path_(path), token_bytes_(token_bytes) {
  MF_CHECK(token_bytes == 2 || token_bytes == 4, "token bytes 2 or 4");
  f_ = std::fopen(path.c_str(), "wb");
  if (!f_) throw UserError(path + ": cannot create: " + std::strerror(errno));
  char zero[kHeader] = {};
  write_all(f_, zero, kHeader, path_);
}

ShardWriter::~ShardWriter() {
  if (f_) std::fclose(f_);
}

void ShardWriter::add_document(const std::vector<int>& tokens, uint32_t domain) {
  if (token_bytes_ == 2) {
    std::vector<uint16_t> t(tokens.begin(), tokens.end());
    write_all(f_, t.data(), t.size() * 2, path_);
  } else {
    std::vector<uint32_t> t(tokens.begin(), tokens.end());
    write_all(f_, t.data(), t.size() * 4, path_);
  }
  num_tokens_ += tokens.size();
  offsets_.push_back(num_tokens_);
  domains_.push_back(domain);
}

void ShardWriter::finish() {
  size_t tok_bytes = num_tokens_ * token_bytes_;
  size_t pad = (8 - tok_bytes % 8) % 8;
  char zero[8] = {};
  write_all(f_, zero, pad, path_);
  write_all(f_, offsets_.data(), offsets_.size() * 8, path_);
  write_all(f_, domains_.data(), domains_.size() * 4, path_);
  // Header last: a shard cut short by a crash has a zero magic and never validates.
  std::fseek(f_, 0, SEEK_SET);
  uint32_t tb = static_cast<uint32_t>(token_bytes_), zero32 = 0;
  uint64_t nd = domains_.size();
  write_all(f_, kMagic, 8, path_);
  write_all(f_, &tb, 4, path_);
  write_all(f_, &zero32, 4, path_);
  write_all(f_, &num_tokens_, 8, path_);
  write_all(f_, &nd, 8, path_);
  if (std::fflush(f_) != 0 || ::fsync(fileno(f_)) != 0) throw UserError(path_ + ": flush failed: " + std::strerror(errno));
  std::fclose(f_);
  f_ = nullptr;
}

TokenShard::TokenShard(const std::string& path, int64_t vocab_size, int64_t num_domains) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw UserError(path + ": cannot open token shard: " + std::strerror(errno));
  struct stat st {};
  ::fstat(fd, &st);
  size_ = static_cast<size_t>(st.st_size);
  if (size_ < kHeader) {
    ::close(fd);
    throw UserError(path + ": corrupt token shard (shorter than its header)");
  }
  map_ = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd, 0);
  ::close(fd);
  if (map_ == MAP_FAILED) {
    map_ = nullptr;
    throw UserError(path + ": cannot map token shard: " + std::strerror(errno));
  }
  auto fail = [&](const std::string& what) {
    ::munmap(map_, size_);
    map_ = nullptr;
    throw UserError(path + ": corrupt token shard (" + what + ")");
  };
  const char* p = static_cast<const char*>(map_);
  if (std::memcmp(p, kMagic, 8) != 0) fail("bad magic; not a moeforge shard or not finished");
  uint32_t tb;
  std::memcpy(&tb, p + 8, 4);
  std::memcpy(&num_tokens_, p + 16, 8);
  std::memcpy(&num_docs_, p + 24, 8);
  if (tb != 2 && tb != 4) fail("token width " + std::to_string(tb));
  token_bytes_ = static_cast<int>(tb);
  // Sizes checked before any multiplication can overflow.
  if (num_tokens_ > size_ || num_docs_ > size_) fail("counts larger than the file");
  size_t tok_bytes = num_tokens_ * tb;
  size_t padded = tok_bytes + (8 - tok_bytes % 8) % 8;
  size_t expected = kHeader + padded + (num_docs_ + 1) * 8 + num_docs_ * 4;
  if (expected != size_) fail("size " + std::to_string(size_) + " != " + std::to_string(expected) + " from its header; truncated?");
  if (tb == 2) tok16_ = reinterpret_cast<const uint16_t*>(p + kHeader);
  else tok32_ = reinterpret_cast<const uint32_t*>(p + kHeader);
  offsets_ = reinterpret_cast<const uint64_t*>(p + kHeader + padded);
  domains_ = reinterpret_cast<const uint32_t*>(p + kHeader + padded + (num_docs_ + 1) * 8);
  if (offsets_[0] != 0 || offsets_[num_docs_] != num_tokens_) fail("document offsets do not span the tokens");
  for (uint64_t d = 0; d < num_docs_; ++d) {
    if (offsets_[d + 1] < offsets_[d]) fail("document offsets decrease at document " + std::to_string(d));
    if (domains_[d] >= static_cast<uint64_t>(std::max<int64_t>(num_domains, 1)))
      fail("domain id out of range at document " + std::to_string(d));
  }
  for (uint64_t i = 0; i < num_tokens_; ++i) {
    if (token(i) >= vocab_size) fail("token " + std::to_string(token(i)) + " at " + std::to_string(i) + " >= vocab size");
  }
}

TokenShard::~TokenShard() {
  if (map_) ::munmap(map_, size_);
}

void TokenShard::copy_tokens(uint64_t begin, uint64_t n, int64_t* out) const {
  MF_CHECK(begin + n <= num_tokens_, "token range inside the shard");
  if (token_bytes_ == 2)
    for (uint64_t i = 0; i < n; ++i) out[i] = tok16_[begin + i];
  else
    for (uint64_t i = 0; i < n; ++i) out[i] = tok32_[begin + i];
}

PreparedMeta read_prepared_meta(const std::string& dir) {
  const std::string path = dir + "/meta.json";
  std::ifstream in(path);
  if (!in) throw UserError(path + ": not found; is '" + dir + "' a directory made by 'moeforge prepare'?");
  PreparedMeta m;
  try {
    auto j = nlohmann::json::parse(in);
    if (j.value("format", "") != "moeforge-tokens") throw UserError(path + ": not a moeforge prepared-data file");
    m.vocab_size = j.at("vocab_size").get<int64_t>();
    m.bos_id = j.at("bos_id").get<int64_t>();
    m.eos_id = j.at("eos_id").get<int64_t>();
    m.token_bytes = j.at("token_bytes").get<int>();
    m.tokenizer = j.at("tokenizer").get<std::string>();
    m.domains = j.at("domains").get<std::vector<std::string>>();
    const auto& s = j.at("splits");
    m.train_shards = s.at("train").at("shards").get<std::vector<std::string>>();
    m.val_shards = s.at("val").at("shards").get<std::vector<std::string>>();
    m.train_tokens = s.at("train").at("tokens").get<int64_t>();
    m.val_tokens = s.at("val").at("tokens").get<int64_t>();
    m.train_docs = s.at("train").at("documents").get<int64_t>();
    m.val_docs = s.at("val").at("documents").get<int64_t>();
  } catch (const nlohmann::json::exception& e) {
    throw UserError(path + ": invalid or incomplete meta.json (" + std::string(e.what()).substr(0, 120) + ")");
  }
  for (const auto& v : {m.train_shards, m.val_shards})
    for (const auto& s : v)
      if (s.find('/') != std::string::npos || s.find("..") != std::string::npos)
        throw UserError(path + ": shard name '" + s + "' must be a plain file name");
  if (m.vocab_size <= 0) throw UserError(path + ": vocab_size must be positive");
  return m;
}

void write_prepared_meta(const std::string& dir, const PreparedMeta& m, uint64_t seed, double val_fraction) {
  nlohmann::json j;
  j["format"] = "moeforge-tokens";
  j["version"] = 1;
  j["vocab_size"] = m.vocab_size;
  j["bos_id"] = m.bos_id;
  j["eos_id"] = m.eos_id;
  j["token_bytes"] = m.token_bytes;
  j["token_dtype"] = m.token_bytes == 2 ? "uint16" : "uint32";
  j["tokenizer"] = m.tokenizer;
  j["domains"] = m.domains;
  j["seed"] = seed;
  j["val_fraction"] = val_fraction;
  j["splits"]["train"] = {{"shards", m.train_shards}, {"tokens", m.train_tokens}, {"documents", m.train_docs}};
  j["splits"]["val"] = {{"shards", m.val_shards}, {"tokens", m.val_tokens}, {"documents", m.val_docs}};
  std::ofstream(dir + "/meta.json") << j.dump(2) << "\n";
}

TokenDataset::TokenDataset(const std::string& dir, const std::string& split) : dir_(dir) {
  meta_ = read_prepared_meta(dir);
  const auto& names = split == "train" ? meta_.train_shards : meta_.val_shards;
  for (const auto& n : names) {
    shards_.push_back(std::make_unique<TokenShard>(dir + "/" + n, meta_.vocab_size,
                                                   static_cast<int64_t>(meta_.domains.size())));
  }
}

uint64_t TokenDataset::num_docs() const {
  uint64_t n = 0;
  for (auto& s : shards_) n += s->num_docs();
  return n;
}

uint64_t TokenDataset::num_tokens() const {
  uint64_t n = 0;
  for (auto& s : shards_) n += s->num_tokens();
  return n;
}

}  // namespace moeforge::data
