#include "checkpoint/manifest.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "core/atomic_file.h"
#include "core/error.h"

// Words are read with memcpy as little-endian: the hash is defined on little-endian words.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "moeforge-h64x4-v1 reads little-endian words");

namespace moeforge::train {

namespace fs = std::filesystem;

namespace {

constexpr uint64_t K1 = 0x9E3779B97F4A7C15ull, K2 = 0xC2B2AE3D27D4EB4Full, K3 = 0x165667B19E3779F9ull;
constexpr uint64_t kSeed = 0xCBF29CE484222325ull;  // the FNV-1a offset basis
constexpr size_t kBlock = 8u << 20;                // read(2) size: large enough that syscalls cost nothing

inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
inline uint64_t round64(uint64_t acc, uint64_t w) { return rotl(acc + w * K2, 31) * K1; }
inline uint64_t load64(const uint8_t* p) {
  uint64_t w;
  std::memcpy(&w, p, 8);
  return w;
}

// Full 32-byte stripes; the four lanes are independent chains, so their multiplies overlap.
void stripes(uint64_t* v, const uint8_t* p, size_t n_stripes) {
  uint64_t a = v[0], b = v[1], c = v[2], d = v[3];
  for (size_t s = 0; s < n_stripes; ++s, p += 32) {
    a = round64(a, load64(p));
    b = round64(b, load64(p + 8));
    c = round64(c, load64(p + 16));
    d = round64(d, load64(p + 24));
  }
  v[0] = a, v[1] = b, v[2] = c, v[3] = d;
}

// A file name of the directory itself: no path, no control characters (names end up in one-line messages).
bool plain_name(const std::string& n) {
  if (n.empty() || n == "." || n == ".." || n == kManifestFile) return false;
  for (unsigned char c : n)
    if (c == '/' || c < 0x20 || c == 0x7f) return false;
  return true;
}

// An untrusted name as it may appear in a message: bounded, control characters as '?'.
std::string printable(const std::string& s) {
  std::string out = s.substr(0, 120);
  for (char& c : out)
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) c = '?';
  return out;
}

// The hash and length of a file, or false with errno set.
bool hash_file(const std::string& path, uint64_t* hash, uint64_t* bytes) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
  std::unique_ptr<uint8_t[]> buf(new uint8_t[kBlock]);
  Hash64 h;
  uint64_t total = 0;
  for (;;) {
    const ssize_t n = ::read(fd, buf.get(), kBlock);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      ::close(fd);
      errno = err;
      return false;
    }
    if (n == 0) break;
    h.update(buf.get(), static_cast<size_t>(n));
    total += static_cast<uint64_t>(n);
  }
  ::close(fd);
  *hash = h.digest();
  *bytes = total;
  return true;
}

// Parses manifest.json's text; "" on success, else what is wrong with it.
std::string parse_manifest(const std::string& text, Manifest* out) {
  try {
    const auto j = nlohmann::json::parse(text);
    auto str = [&](const char* key) {
      auto it = j.find(key);
      return it != j.end() && it->is_string() ? it->get<std::string>() : std::string("?");
    };
    if (!j.is_object() || str("format") != kManifestFormat)
      return std::string("not a manifest (\"format\" is not \"") + kManifestFormat + "\")";
    if (str("hash") != kHashName) return "names the hash '" + printable(str("hash")) + "'; this moeforge knows " + kHashName;
    auto files = j.find("files");
    if (files == j.end() || !files->is_object()) return "\"files\" is missing or not an object";
    for (const auto& [name, e] : files->items()) {
      if (!plain_name(name)) return "lists '" + printable(name) + "', which is not a plain file name";
      auto b = e.is_object() ? e.find("bytes") : e.end();
      auto h = e.is_object() ? e.find("hash") : e.end();
      if (b == e.end() || !b->is_number_unsigned() || h == e.end() || !h->is_string() ||
          h->get<std::string>().size() != 16 || h->get<std::string>().find_first_not_of("0123456789abcdef") != std::string::npos)
        return "the entry of '" + name + "' is not {\"bytes\": N, \"hash\": \"<16 hex digits>\"}";
      (*out)[name] = {b->get<uint64_t>(), h->get<std::string>()};
    }
  } catch (const nlohmann::json::exception& e) {
    return "not valid JSON (" + printable(e.what()) + ")";
  }
  return "";
}

bool read_text(const std::string& path, std::string* text) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  std::ostringstream ss;
  ss << in.rdbuf();
  *text = ss.str();
  return !in.bad();
}

CheckpointCheck damaged(const std::string& file, const std::string& problem) {
  CheckpointCheck c;
  c.ok = false;
  c.file = file;
  c.problem = problem;
  return c;
}

// What verify_checkpoint_once compares: the manifest's text and every listed file's identity and times.
// "" when there is no manifest or it cannot be read (those are never cached).
std::string fingerprint(const std::string& dir) {
  std::string text;
  Manifest m;
  if (!read_text(dir + "/" + kManifestFile, &text) || !parse_manifest(text, &m).empty()) return "";
  std::error_code ec;
  std::string fp = fs::weakly_canonical(dir, ec).string() + "\n" + text;
  for (const auto& [name, e] : m) {
    struct stat st;
    if (::stat((dir + "/" + name).c_str(), &st) != 0) return "";
    char buf[160];
    std::snprintf(buf, sizeof buf, "\n%lu %lu %ld %ld.%09ld %ld.%09ld", static_cast<unsigned long>(st.st_dev),
                  static_cast<unsigned long>(st.st_ino), static_cast<long>(st.st_size), static_cast<long>(st.st_mtim.tv_sec),
                  st.st_mtim.tv_nsec, static_cast<long>(st.st_ctim.tv_sec), st.st_ctim.tv_nsec);
    fp += name + buf;
  }
  return fp;
}

}  // namespace

Hash64::Hash64() {
  for (int i = 0; i < 4; ++i) v_[i] = kSeed + static_cast<uint64_t>(i) * K1;
}

void Hash64::update(const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  total_ += n;
  if (buffered_ > 0) {  // complete the stripe an earlier call left open
    const size_t take = std::min(n, 32 - buffered_);
    std::memcpy(buf_ + buffered_, p, take);
    buffered_ += take, p += take, n -= take;
    if (buffered_ < 32) return;
    stripes(v_, buf_, 1);
    buffered_ = 0;
  }
  stripes(v_, p, n / 32);
  p += n / 32 * 32;
  buffered_ = n % 32;
  std::memcpy(buf_, p, buffered_);
}

uint64_t Hash64::digest() const {
  uint64_t v[4] = {v_[0], v_[1], v_[2], v_[3]};
  if (buffered_ > 0) {
    uint8_t last[32] = {};
    std::memcpy(last, buf_, buffered_);
    stripes(v, last, 1);
  }
  uint64_t h = total_ * K1;
  for (int i = 0; i < 4; ++i) h = rotl(h ^ round64(0, v[i]), 27) * K1 + K3;
  h ^= h >> 33;
  h *= K2;
  h ^= h >> 29;
  h *= K3;
  h ^= h >> 32;
  return h;
}

uint64_t hash_bytes(const void* data, size_t n) {
  Hash64 h;
  h.update(data, n);
  return h.digest();
}

std::string hash_hex(uint64_t h) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

Manifest compute_manifest(const std::string& dir) {
  Manifest m;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (name == kManifestFile || !e.is_regular_file()) continue;
    uint64_t h = 0, bytes = 0;
    if (!hash_file(e.path().string(), &h, &bytes))
      throw UserError(e.path().string() + ": cannot read back for the manifest (" + std::strerror(errno) + ")");
    m[name] = {bytes, hash_hex(h)};
  }
  return m;
}

void write_manifest(const std::string& dir) {
  nlohmann::ordered_json files = nlohmann::ordered_json::object();
  for (const auto& [name, e] : compute_manifest(dir)) files[name] = {{"bytes", e.bytes}, {"hash", e.hash}};
  nlohmann::ordered_json j = {{"format", kManifestFormat}, {"hash", kHashName}, {"files", files}};
  write_file(dir + "/" + kManifestFile, j.dump(2) + "\n");
}

Manifest read_manifest(const std::string& dir) {
  const std::string path = dir + "/" + kManifestFile;
  std::string text;
  if (!read_text(path, &text)) throw UserError(path + ": cannot read");
  Manifest m;
  const std::string problem = parse_manifest(text, &m);
  if (!problem.empty()) throw UserError(path + ": " + problem);
  return m;
}

std::string CheckpointCheck::message(const std::string& dir) const { return dir + "/" + file + ": " + problem; }

namespace {
// verify_checkpoint, with the hashes (`hashes`) or sizes only.
CheckpointCheck check_checkpoint(const std::string& dir, bool hashes) {
  const std::string mp = dir + "/" + kManifestFile;
  struct stat st;
  // Written before manifests: accepted unchecked. (Not a directory at all: the callers' own checks say so.)
  if (::stat(mp.c_str(), &st) != 0 && (errno == ENOENT || errno == ENOTDIR)) {
    CheckpointCheck c;
    c.legacy = true;
    return c;
  }
  std::string text;
  if (!read_text(mp, &text)) return damaged(kManifestFile, std::string("unreadable (") + std::strerror(errno) + ")");
  Manifest m;
  const std::string problem = parse_manifest(text, &m);
  if (!problem.empty()) return damaged(kManifestFile, "unreadable: " + problem);
  // Sizes first: a truncated file is found without reading gigabytes of the others.
  for (const auto& [name, e] : m) {
    if (::stat((dir + "/" + name).c_str(), &st) != 0)
      return damaged(name, errno == ENOENT ? "missing (manifest.json lists it)"
                                           : std::string("cannot stat (") + std::strerror(errno) + ")");
    if (!S_ISREG(st.st_mode)) return damaged(name, "not a regular file");
    const auto size = static_cast<uint64_t>(st.st_size);
    if (size < e.bytes)
      return damaged(name, "truncated (" + std::to_string(size) + " of " + std::to_string(e.bytes) + " bytes)");
    if (size > e.bytes)
      return damaged(name, "has " + std::to_string(size) + " bytes, manifest.json says " + std::to_string(e.bytes));
  }
  if (!hashes) return {};
  for (const auto& [name, e] : m) {
    uint64_t h = 0, bytes = 0;
    if (!hash_file(dir + "/" + name, &h, &bytes)) return damaged(name, std::string("cannot read (") + std::strerror(errno) + ")");
    if (bytes != e.bytes)
      return damaged(name, "changed size while being read (" + std::to_string(bytes) + " of " + std::to_string(e.bytes) + " bytes)");
    if (hash_hex(h) != e.hash) return damaged(name, "corrupt (content hash " + hash_hex(h) + ", manifest.json says " + e.hash + ")");
  }
  return {};
}

std::mutex verified_mu;
std::set<std::string> verified;  // fingerprints of directories that verified in this process

// check_checkpoint, skipped for a directory that verified earlier, and remembered when it passes.
CheckpointCheck check_once(const std::string& dir, bool hashes) {
  const std::string before = fingerprint(dir);
  if (!before.empty()) {
    std::lock_guard<std::mutex> lock(verified_mu);
    if (verified.count(before)) return {};
  }
  CheckpointCheck c = check_checkpoint(dir, hashes);
  if (c.ok && !c.legacy && !before.empty() && fingerprint(dir) == before) {
    std::lock_guard<std::mutex> lock(verified_mu);
    verified.insert(before);
  }
  return c;
}
}  // namespace

CheckpointCheck verify_checkpoint(const std::string& dir) { return check_checkpoint(dir, true); }

CheckpointCheck verify_checkpoint_once(const std::string& dir) { return check_once(dir, true); }

CheckpointCheck accept_checkpoint_verified_by_main(const std::string& dir) { return check_once(dir, false); }

void rank0_decides(const JobRanks& job, const std::string& problem, const std::string& others) {
  const int64_t stop = problem.empty() ? 0 : 1;
  if ((job.from_main ? job.from_main(stop) : stop) != 0) throw UserError(job.main ? problem : others);
}

void any_rank_stops(const JobRanks& job, const std::string& problem, const std::string& others) {
  // Every rank learns whether any has a problem (a rank stopping alone would leave the others waiting).
  const int64_t stop = problem.empty() ? 0 : 1;
  if ((job.sum ? job.sum(stop) : stop) != 0) throw UserError(problem.empty() ? others : problem);
}

void require_intact_checkpoint_once_per_job(const std::string& dir, const JobRanks& job) {
  if (!job.from_main || !job.sum) return require_intact_checkpoint(dir);
  std::string problem;
  if (job.main) {
    const CheckpointCheck c = verify_checkpoint_once(dir);
    if (!c.ok) problem = c.message(dir) + "; the checkpoint is damaged";
  }
  rank0_decides(job, problem, dir + ": rank 0 found the checkpoint damaged");
  if (!job.main) {
    const CheckpointCheck c = accept_checkpoint_verified_by_main(dir);
    if (!c.ok) problem = c.message(dir) + "; the checkpoint is damaged";
  }
  any_rank_stops(job, problem, dir + ": another rank found the checkpoint damaged");
}

void require_intact_checkpoint(const std::string& dir) {
  const CheckpointCheck c = verify_checkpoint_once(dir);
  if (!c.ok) throw UserError(c.message(dir) + "; the checkpoint is damaged");
}

}  // namespace moeforge::train
