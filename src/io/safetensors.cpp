#include "io/safetensors.h"

#include <ATen/ATen.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <tuple>
#include <utility>

#include "core/error.h"

// Tensor bytes are copied to and from files verbatim; safetensors is little-endian.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors I/O assumes a little-endian host");

namespace moeforge::io {
namespace {

// The reference implementation's cap: a bigger header is an attack, not a model.
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;
constexpr const char* kMetadataKey = "__metadata__";

const std::vector<std::pair<std::string, at::ScalarType>>& dtype_table() {
  static const std::vector<std::pair<std::string, at::ScalarType>> table = {
      {"F64", at::kDouble}, {"F32", at::kFloat}, {"F16", at::kHalf},  {"BF16", at::kBFloat16},
      {"I64", at::kLong},   {"I32", at::kInt},   {"I16", at::kShort}, {"I8", at::kChar},
      {"U8", at::kByte},    {"BOOL", at::kBool}};
  return table;
}

std::string supported_dtypes() {
  std::string s;
  for (const auto& [name, _] : dtype_table()) s += (s.empty() ? "" : " ") + name;
  return s;
}

// Names come from strangers' files: keep messages on one line and of bounded length.
std::string printable(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (out.size() >= 200) return out + "...";
    if (c < 0x20 || c == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out;
}

[[noreturn]] void fail(const std::string& path, const std::string& what) { throw UserError(path + ": " + what); }

[[noreturn]] void fail_tensor(const std::string& path, const std::string& name, const std::string& what) {
  fail(path, "tensor '" + printable(name) + "': " + what);
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// Bytes of a tensor of `shape` and `elem` bytes per element, or false on overflow. The product of
// the non-zero dims must also fit int64, or LibTorch's own stride arithmetic would overflow.
bool checked_nbytes(const std::vector<int64_t>& shape, uint64_t elem, uint64_t* nbytes) {
  uint64_t nonzero = 1;
  bool has_zero = false;
  for (int64_t d : shape) {
    if (d == 0) has_zero = true;
    else if (__builtin_mul_overflow(nonzero, static_cast<uint64_t>(d), &nonzero)) return false;
  }
  if (nonzero > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return false;
  return !__builtin_mul_overflow(has_zero ? 0 : nonzero, elem, nbytes);
}

// A failed write (disk full: ENOSPC; a file-size limit: EFBIG) closes the file, removes the torn file and is a
// UserError "<path>: write failed: <reason>". Short writes are continued.
[[noreturn]] void write_failed(int fd, const std::string& path, const std::string& what, int err) {
  if (fd >= 0) ::close(fd);
  ::unlink(path.c_str());
  fail(path, what + ": " + std::strerror(err));
}

void write_all(int fd, const void* data, size_t n, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) write_failed(fd, path, "write failed", errno);
    if (w == 0) write_failed(fd, path, "write failed", EIO);  // no progress on a regular file: fail, not spin
    p += w;
    n -= static_cast<size_t>(w);
  }
}

// A tensor as plain CPU bytes in row-major order, whatever it was.
at::Tensor to_plain_cpu(const at::Tensor& t) {
  at::Tensor x = t.detach();
  if (x.layout() != at::kStrided) x = x.to_dense();
  return x.to(at::kCPU).resolve_conj().resolve_neg().contiguous();
}

// An integer JSON value in [lo, hi], or false.
bool get_int(const nlohmann::json& v, int64_t lo, uint64_t hi, uint64_t* out, bool* negative) {
  *negative = false;
  if (!v.is_number_integer()) return false;
  if (v.is_number_unsigned()) {
    *out = v.get<uint64_t>();
    return *out <= hi;
  }
  int64_t s = v.get<int64_t>();
  if (s < lo) {
    *negative = true;
    return false;
  }
  *out = static_cast<uint64_t>(s);
  return *out <= hi;
}

TensorEntry parse_entry(const std::string& path, const std::string& name, const nlohmann::json& v,
                        uint64_t data_size) {
  TensorEntry e;
  e.name = name;
  if (!v.is_object()) fail_tensor(path, name, "header entry is not a JSON object");
  auto dt = v.find("dtype");
  if (dt == v.end() || !dt->is_string()) fail_tensor(path, name, "'dtype' is missing or not a string");
  e.dtype = dt->get<std::string>();
  auto known = std::find_if(dtype_table().begin(), dtype_table().end(), [&](const auto& p) { return p.first == e.dtype; });
  if (known == dtype_table().end())
    fail_tensor(path, name, "unknown dtype '" + printable(e.dtype) + "' (supported: " + supported_dtypes() + ")");

  auto sh = v.find("shape");
  if (sh == v.end() || !sh->is_array()) fail_tensor(path, name, "'shape' is missing or not an array");
  for (const auto& d : *sh) {
    uint64_t u;
    bool negative;
    if (!get_int(d, 0, std::numeric_limits<int64_t>::max(), &u, &negative))
      fail_tensor(path, name, negative ? "negative dimension " + d.dump() + " in 'shape'"
                                       : "'shape' holds " + printable(d.dump()) + ", not a dimension size");
    e.shape.push_back(static_cast<int64_t>(u));
  }

  auto off = v.find("data_offsets");
  bool negative = false;
  if (off == v.end() || !off->is_array() || off->size() != 2 ||
      !get_int((*off)[0], 0, std::numeric_limits<uint64_t>::max(), &e.begin, &negative) ||
      !get_int((*off)[1], 0, std::numeric_limits<uint64_t>::max(), &e.end, &negative))
    fail_tensor(path, name, "'data_offsets' is missing or not [begin, end] with non-negative integers");
  if (e.begin > e.end)
    fail_tensor(path, name, "data_offsets begin " + std::to_string(e.begin) + " > end " + std::to_string(e.end));
  if (e.end > data_size)
    fail_tensor(path, name, "data_offsets end " + std::to_string(e.end) + " is beyond the data section (" +
                                std::to_string(data_size) + " bytes; file truncated?)");

  uint64_t nbytes;
  if (!checked_nbytes(e.shape, c10::elementSize(known->second), &nbytes))
    fail_tensor(path, name, "shape " + shape_str(e.shape) + " is too large");
  if (nbytes != e.end - e.begin)
    fail_tensor(path, name, "shape " + shape_str(e.shape) + " of " + e.dtype + " needs " + std::to_string(nbytes) +
                                " bytes but data_offsets span " + std::to_string(e.end - e.begin));
  return e;
}

std::map<std::string, std::string> parse_metadata(const std::string& path, const nlohmann::json& v) {
  if (!v.is_object()) fail(path, "'__metadata__' is not a JSON object");
  std::map<std::string, std::string> out;
  for (const auto& [k, val] : v.items()) {
    if (!val.is_string()) fail(path, "'__metadata__' value for key '" + printable(k) + "' is not a string");
    out[k] = val.get<std::string>();
  }
  return out;
}

// Parses the header JSON, rejecting duplicate top-level keys (the parser would silently keep the last).
nlohmann::json parse_header_json(const std::string& path, const char* begin, const char* end) {
  std::set<std::string> seen;
  auto on_event = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    if (depth == 1 && event == nlohmann::json::parse_event_t::key && !seen.insert(parsed.get<std::string>()).second)
      fail(path, "header lists '" + printable(parsed.get<std::string>()) + "' twice");
    return true;
  };
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(begin, end, on_event);
  } catch (const nlohmann::json::exception& e) {
    fail(path, std::string("header is not valid JSON: ") + e.what());
  }
  if (!j.is_object()) fail(path, "header is not a JSON object");
  return j;
}

}  // namespace

at::ScalarType safetensors_dtype_to_scalar(const std::string& dtype) {
  for (const auto& [name, t] : dtype_table())
    if (name == dtype) return t;
  throw UserError("unknown safetensors dtype '" + printable(dtype) + "' (supported: " + supported_dtypes() + ")");
}

std::string scalar_to_safetensors_dtype(at::ScalarType t) {
  for (const auto& [name, s] : dtype_table())
    if (s == t) return name;
  throw UserError(std::string("dtype ") + c10::toString(t) + " cannot be stored in safetensors (supported: " +
                  supported_dtypes() + ")");
}

void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  // The header needs only shapes and dtypes, so tensors are materialised on the CPU one at a time
  // while writing: a GPU model is never copied to host memory all at once.
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header[kMetadataKey] = metadata;
  std::set<std::string> names;
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    MF_CHECK(t.defined(), "undefined tensor '" + name + "'");
    if (name == kMetadataKey) fail(path, "a tensor cannot be named '__metadata__'");
    if (!names.insert(name).second) fail_tensor(path, name, "name given twice");
    std::string dtype;
    try {
      dtype = scalar_to_safetensors_dtype(t.scalar_type());
    } catch (const UserError& e) {
      fail_tensor(path, name, e.what());
    }
    uint64_t nbytes = static_cast<uint64_t>(t.numel()) * t.element_size();
    header[name] = {{"dtype", dtype}, {"shape", t.sizes().vec()}, {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
  }
  std::string json = header.dump();
  json.append((8 - json.size() % 8) % 8, ' ');  // 8 + N stays a multiple of 8: aligned data section
  uint8_t len_le[8];
  for (int i = 0; i < 8; ++i) len_le[i] = static_cast<uint8_t>(static_cast<uint64_t>(json.size()) >> (8 * i));

  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail(path, std::string("cannot open for writing: ") + std::strerror(errno));
  write_all(fd, len_le, sizeof len_le, path);
  write_all(fd, json.data(), json.size(), path);
  for (const auto& [name, t] : tensors) {
    at::Tensor plain = to_plain_cpu(t);
    if (plain.numel() > 0) write_all(fd, plain.data_ptr(), plain.numel() * plain.element_size(), path);
  }
  if (::fsync(fd) != 0) write_failed(fd, path, "fsync failed", errno);
  if (::close(fd) != 0) write_failed(-1, path, "close failed", errno);
}

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path, std::string("cannot open: ") + std::strerror(errno));
  struct stat st;
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path, "not a regular file");
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    fail(path, "too short for a safetensors file (" + std::to_string(size) + " bytes, at least 8 needed)");
  }
  // The mapping assumes nobody truncates the file while it is open (that would be SIGBUS, as in
  // every mmap reader); `get` copies out, so tensors outlive the mapping.
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  int map_errno = errno;
  ::close(fd);
  if (map == MAP_FAILED) fail(path, std::string("cannot map: ") + std::strerror(map_errno));

  SafetensorsFile f;  // owns the mapping from here, so every failure below unmaps it
  f.path_ = path;
  f.map_ = map;
  f.map_size_ = size;
  const auto* bytes = static_cast<const uint8_t*>(map);

  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(bytes[i]) << (8 * i);
  if (n > kMaxHeaderBytes)
    fail(path, "header length " + std::to_string(n) + " exceeds the 100 MiB limit (not a safetensors file?)");
  if (n > size - 8)
    fail(path, "header length " + std::to_string(n) + " exceeds the file size " + std::to_string(size) +
                   " (not a safetensors file, or truncated?)");
  const auto* json_begin = reinterpret_cast<const char*>(bytes + 8);
  nlohmann::json header = parse_header_json(path, json_begin, json_begin + n);
  const uint64_t data_size = size - 8 - n;
  f.data_ = bytes + 8 + n;

  for (const auto& [key, v] : header.items()) {
    if (key == kMetadataKey) f.metadata_ = parse_metadata(path, v);
    else f.entries_[key] = parse_entry(path, key, v, data_size);
  }

  std::vector<const TensorEntry*> by_offset;
  for (const auto& [_, e] : f.entries_) by_offset.push_back(&e);
  std::sort(by_offset.begin(), by_offset.end(), [](const TensorEntry* a, const TensorEntry* b) {
    return std::tie(a->begin, a->end, a->name) < std::tie(b->begin, b->end, b->name);
  });
  // Zero-byte spans share no bytes with anything, so only non-empty spans can overlap.
  const TensorEntry* prev = nullptr;
  for (const TensorEntry* e : by_offset) {
    if (e->begin == e->end) continue;
    if (prev && e->begin < prev->end)
      fail(path, "tensor '" + printable(e->name) + "' (bytes " + std::to_string(e->begin) + ".." +
                     std::to_string(e->end) + ") overlaps tensor '" + printable(prev->name) + "' (bytes " +
                     std::to_string(prev->begin) + ".." + std::to_string(prev->end) + ")");
    prev = e;
  }
  for (const TensorEntry* e : by_offset) f.order_.push_back(e->name);
  return f;
}

SafetensorsFile::SafetensorsFile(SafetensorsFile&& other) noexcept { *this = std::move(other); }

SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&& other) noexcept {
  if (this != &other) {
    release();
    path_ = std::move(other.path_);
    map_ = std::exchange(other.map_, nullptr);
    map_size_ = std::exchange(other.map_size_, 0);
    data_ = std::exchange(other.data_, nullptr);
    entries_ = std::move(other.entries_);
    order_ = std::move(other.order_);
    metadata_ = std::move(other.metadata_);
  }
  return *this;
}

SafetensorsFile::~SafetensorsFile() { release(); }

void SafetensorsFile::release() noexcept {
  if (map_) ::munmap(map_, map_size_);
  map_ = nullptr;
  map_size_ = 0;
  data_ = nullptr;
}

std::vector<std::string> SafetensorsFile::names() const { return order_; }

bool SafetensorsFile::contains(const std::string& name) const { return entries_.count(name) > 0; }

const TensorEntry& SafetensorsFile::entry(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) fail(path_, "no tensor '" + printable(name) + "'" + did_you_mean(name, order_));
  return it->second;
}

at::Tensor SafetensorsFile::get(const std::string& name) const {
  const TensorEntry& e = entry(name);
  return copy_out(e, e.shape, e.begin, e.end);
}

at::Tensor SafetensorsFile::get_rows(const std::string& name, int64_t first, int64_t count) const {
  const TensorEntry& e = entry(name);
  if (e.shape.empty() || first < 0 || count < 0 || first + count > e.shape[0])
    throw UserError(path_ + ": tensor '" + name + "' has no rows [" + std::to_string(first) + ", " +
                    std::to_string(first + count) + ")");
  const uint64_t row_bytes = e.shape[0] == 0 ? 0 : (e.end - e.begin) / static_cast<uint64_t>(e.shape[0]);
  auto shape = e.shape;
  shape[0] = count;
  return copy_out(e, shape, e.begin + row_bytes * static_cast<uint64_t>(first),
                  e.begin + row_bytes * static_cast<uint64_t>(first + count));
}

at::Tensor SafetensorsFile::copy_out(const TensorEntry& e, std::vector<int64_t> shape, uint64_t begin, uint64_t end) const {
  const at::ScalarType t = safetensors_dtype_to_scalar(e.dtype);
  // A stranger's BOOL byte may be any value; read bytes and compare so every bool is 0 or 1.
  const bool is_bool = t == at::kBool;
  at::Tensor out = at::empty(shape, at::TensorOptions().dtype(is_bool ? at::kByte : t));
  if (end > begin) {
    std::memcpy(out.data_ptr(), data_ + begin, end - begin);
    // The copied pages leave this process's resident set (they stay in the page cache): loading a model tensor
    // by tensor then never holds the mapped file and the copies at once. Clean private pages: dropping them
    // is safe, a later read faults them in again.
    const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
    const uintptr_t lo = reinterpret_cast<uintptr_t>(data_ + begin) & ~(page - 1);
    const uintptr_t hi = reinterpret_cast<uintptr_t>(data_ + end);
    ::madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
  }
  return is_bool ? out.ne(0) : out;
}

}  // namespace moeforge::io
