#include "io/gguf.h"

#include <ATen/ATen.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <set>

#include "core/error.h"

namespace moeforge::io {

namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" little-endian

at::ScalarType scalar_of(GgmlType t) {
  return t == GgmlType::F32 ? at::kFloat : t == GgmlType::F16 ? at::kHalf : at::kBFloat16;
}

constexpr int64_t kBlock = 32;
constexpr uint64_t kQ4Bytes = 2 + kBlock / 2, kQ8Bytes = 2 + kBlock;

uint16_t fp16_bits(float x) {  // round to nearest even, as ggml's GGML_FP32_TO_FP16
  const c10::Half h(x);
  return h.x;
}
float fp16_value(uint16_t bits) { return static_cast<float>(c10::Half(bits, c10::Half::from_bits())); }

}  // namespace

bool ggml_is_block_type(GgmlType t) { return t == GgmlType::Q4_0 || t == GgmlType::Q8_0; }

uint64_t ggml_nbytes(GgmlType t, uint64_t numel) {
  switch (t) {
    case GgmlType::F32: return numel * 4;
    case GgmlType::F16:
    case GgmlType::BF16: return numel * 2;
    case GgmlType::Q4_0: return numel / kBlock * kQ4Bytes;
    case GgmlType::Q8_0: return numel / kBlock * kQ8Bytes;
  }
  return 0;
}

std::vector<uint8_t> ggml_quantize(GgmlType t, const at::Tensor& rows) {
  const at::Tensor x = rows.detach().to(at::kCPU, at::kFloat).contiguous();
  MF_CHECK(ggml_is_block_type(t) && x.numel() % kBlock == 0, "values in whole blocks of 32");
  const float* v = x.data_ptr<float>();
  const int64_t blocks = x.numel() / kBlock;
  std::vector<uint8_t> out(ggml_nbytes(t, static_cast<uint64_t>(x.numel())));
  uint8_t* o = out.data();
  for (int64_t b = 0; b < blocks; ++b, v += kBlock) {
    float amax = 0, max = 0;  // the largest magnitude, and that value with its sign
    for (int64_t j = 0; j < kBlock; ++j)
      if (amax < std::fabs(v[j])) {
        amax = std::fabs(v[j]);
        max = v[j];
      }
    const float d = t == GgmlType::Q4_0 ? max / -8 : amax / 127;
    const float id = d != 0 ? 1.0f / d : 0.0f;
    const uint16_t db = fp16_bits(d);
    std::memcpy(o, &db, 2);
    if (t == GgmlType::Q4_0) {
      for (int64_t j = 0; j < kBlock / 2; ++j) {
        const uint8_t lo = static_cast<uint8_t>(std::min(15, static_cast<int>(static_cast<int8_t>(v[j] * id + 8.5f))));
        const uint8_t hi =
            static_cast<uint8_t>(std::min(15, static_cast<int>(static_cast<int8_t>(v[j + kBlock / 2] * id + 8.5f))));
        o[2 + j] = static_cast<uint8_t>(lo | (hi << 4));
      }
      o += kQ4Bytes;
    } else {
      for (int64_t j = 0; j < kBlock; ++j) o[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(std::round(v[j] * id)));
      o += kQ8Bytes;
    }
  }
  return out;
}

at::Tensor ggml_dequantize(GgmlType t, const uint8_t* p, const std::vector<int64_t>& shape) {
  auto out = at::empty(shape, at::TensorOptions().dtype(at::kFloat));
  float* y = out.data_ptr<float>();
  const int64_t blocks = out.numel() / kBlock;
  for (int64_t b = 0; b < blocks; ++b, y += kBlock) {
    uint16_t db;
    std::memcpy(&db, p, 2);
    const float d = fp16_value(db);
    if (t == GgmlType::Q4_0) {
      for (int64_t j = 0; j < kBlock / 2; ++j) {
        y[j] = static_cast<float>((p[2 + j] & 0x0F) - 8) * d;
        y[j + kBlock / 2] = static_cast<float>((p[2 + j] >> 4) - 8) * d;
      }
      p += kQ4Bytes;
    } else {
      for (int64_t j = 0; j < kBlock; ++j) y[j] = static_cast<float>(static_cast<int8_t>(p[2 + j])) * d;
      p += kQ8Bytes;
    }
  }
  return out;
}

namespace {

struct Out {
  std::string buf;
  void raw(const void* p, size_t n) { buf.append(static_cast<const char*>(p), n); }
  template <class T>
  void put(T v) { raw(&v, sizeof v); }
  void str(const std::string& s) {
    put<uint64_t>(s.size());
    raw(s.data(), s.size());
  }
};

void write_value(Out& o, const GgufValue& v) {
  switch (v.type) {
    case GgufType::U32: o.put<uint32_t>(static_cast<uint32_t>(v.u)); break;
    case GgufType::I32: o.put<int32_t>(static_cast<int32_t>(v.i)); break;
    case GgufType::F32: o.put<float>(static_cast<float>(v.f)); break;
    case GgufType::BOOL: o.put<uint8_t>(v.u ? 1 : 0); break;
    case GgufType::STRING: o.str(v.s); break;
    case GgufType::ARRAY:
      o.put<uint32_t>(static_cast<uint32_t>(v.array_type));
      o.put<uint64_t>(v.array.size());
      for (const auto& e : v.array) write_value(o, e);
      break;
    default: MF_CHECK(false, "value type not written by moeforge");
  }
}

}  // namespace

void GgufWriter::add_u32(const std::string& k, uint32_t v) { GgufValue x; x.type = GgufType::U32; x.u = v; kv_.emplace_back(k, x); }
void GgufWriter::add_i32(const std::string& k, int32_t v) { GgufValue x; x.type = GgufType::I32; x.i = v; kv_.emplace_back(k, x); }
void GgufWriter::add_f32(const std::string& k, float v) { GgufValue x; x.type = GgufType::F32; x.f = v; kv_.emplace_back(k, x); }
void GgufWriter::add_bool(const std::string& k, bool v) { GgufValue x; x.type = GgufType::BOOL; x.u = v; kv_.emplace_back(k, x); }
void GgufWriter::add_string(const std::string& k, const std::string& v) { GgufValue x; x.type = GgufType::STRING; x.s = v; kv_.emplace_back(k, x); }

void GgufWriter::add_string_array(const std::string& k, const std::vector<std::string>& v) {
  GgufValue x;
  x.type = GgufType::ARRAY;
  x.array_type = GgufType::STRING;
  for (const auto& s : v) { GgufValue e; e.type = GgufType::STRING; e.s = s; x.array.push_back(e); }
  kv_.emplace_back(k, x);
}
void GgufWriter::add_f32_array(const std::string& k, const std::vector<float>& v) {
  GgufValue x;
  x.type = GgufType::ARRAY;
  x.array_type = GgufType::F32;
  for (float f : v) { GgufValue e; e.type = GgufType::F32; e.f = f; x.array.push_back(e); }
  kv_.emplace_back(k, x);
}
void GgufWriter::add_i32_array(const std::string& k, const std::vector<int32_t>& v) {
  GgufValue x;
  x.type = GgufType::ARRAY;
  x.array_type = GgufType::I32;
  for (int32_t i : v) { GgufValue e; e.type = GgufType::I32; e.i = i; x.array.push_back(e); }
  kv_.emplace_back(k, x);
}

void GgufWriter::add_tensor(const std::string& name, const at::Tensor& t, GgmlType type) {
  Tensor x;
  x.name = name;
  x.shape = t.sizes().vec();
  x.type = type;
  MF_CHECK(!ggml_is_block_type(type) || (!x.shape.empty() && x.shape.back() % kBlock == 0),
           "GGUF tensor " + name + ": rows of whole blocks");
  x.data = t.detach();
  tensors_.push_back(std::move(x));
}

void GgufWriter::declare_tensor(const std::string& name, const std::vector<int64_t>& shape, GgmlType type) {
  MF_CHECK(!shape.empty() && shape[0] > 0, "a declared GGUF tensor has rows");
  MF_CHECK(!ggml_is_block_type(type) || shape.back() % kBlock == 0, "GGUF tensor " + name + ": rows of whole blocks");
  Tensor x;
  x.name = name;
  x.shape = shape;
  x.type = type;
  tensors_.push_back(std::move(x));
}

void GgufWriter::write(const std::string& path, uint32_t alignment) const { start(path, alignment).close(); }

GgufSink GgufWriter::start(const std::string& path, uint32_t alignment, const std::string& shown) const {
  Out o;
  o.put<uint32_t>(kMagic);
  o.put<uint32_t>(3);
  o.put<uint64_t>(tensors_.size());
  o.put<uint64_t>(kv_.size() + 1);
  o.str("general.alignment");
  o.put<uint32_t>(static_cast<uint32_t>(GgufType::U32));
  o.put<uint32_t>(alignment);
  for (const auto& [k, v] : kv_) {
    o.str(k);
    o.put<uint32_t>(static_cast<uint32_t>(v.type));
    write_value(o, v);
  }
  uint64_t offset = 0;
  std::vector<uint64_t> offsets;
  for (const auto& t : tensors_) {
    o.str(t.name);
    o.put<uint32_t>(static_cast<uint32_t>(t.shape.size()));
    for (auto it = t.shape.rbegin(); it != t.shape.rend(); ++it) o.put<uint64_t>(static_cast<uint64_t>(*it));
    o.put<uint32_t>(static_cast<uint32_t>(t.type));
    o.put<uint64_t>(offset);
    offsets.push_back(offset);
    uint64_t n = 1;
    for (int64_t d : t.shape) n *= static_cast<uint64_t>(d);
    offset += ggml_nbytes(t.type, n);
    offset = (offset + alignment - 1) / alignment * alignment;
  }
  const uint64_t data_start = (o.buf.size() + alignment - 1) / alignment * alignment;
  GgufSink sink;
  sink.path_ = path;
  sink.shown_ = shown.empty() ? path : shown;
  sink.fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (sink.fd_ < 0) throw UserError(sink.shown_ + ": cannot create: " + std::strerror(errno));
  for (size_t i = 0; i < tensors_.size(); ++i) {
    GgufSink::Slot slot{tensors_[i].shape, tensors_[i].type, data_start + offsets[i],
                        std::vector<bool>(static_cast<size_t>(tensors_[i].shape.empty() ? 1 : tensors_[i].shape[0]))};
    MF_CHECK(sink.slots_.emplace(tensors_[i].name, std::move(slot)).second, "GGUF tensor " + tensors_[i].name + " twice");
  }
  // The header, the padding up to the data and the file's full size (the tensors fill it in place).
  o.buf.resize(data_start, '\0');
  sink.put_bytes(0, o.buf.data(), o.buf.size());
  if (::ftruncate(sink.fd_, static_cast<off_t>(data_start + offset)) != 0)
    throw UserError(sink.shown_ + ": cannot size the file: " + std::strerror(errno));
  for (const auto& t : tensors_)
    if (t.data.defined()) sink.put(t.name, 0, t.shape.empty() ? t.data.reshape({1}) : t.data);
  return sink;
}

GgufSink::GgufSink(GgufSink&& o) noexcept
    : path_(std::move(o.path_)), shown_(std::move(o.shown_)), fd_(o.fd_), slots_(std::move(o.slots_)) {
  o.fd_ = -1;
}

GgufSink::~GgufSink() {
  if (fd_ < 0) return;
  ::close(fd_);
  ::unlink(path_.c_str());
}

void GgufSink::put_bytes(uint64_t at, const void* data, uint64_t n) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::pwrite(fd_, p, std::min<uint64_t>(n, 1ULL << 30), static_cast<off_t>(at));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) throw UserError(shown_ + ": write failed: " + std::strerror(w < 0 ? errno : EIO));
    p += w;
    at += static_cast<uint64_t>(w);
    n -= static_cast<uint64_t>(w);
  }
}

void GgufSink::put(const std::string& name, int64_t first_row, const at::Tensor& rows) {
  auto it = slots_.find(name);
  MF_CHECK(it != slots_.end(), "GGUF tensor " + name + " was not declared");
  Slot& s = it->second;
  MF_CHECK(fd_ >= 0, "GGUF sink closed");
  const at::Tensor t = s.shape.empty() ? rows.reshape({1}) : rows;
  const int64_t n = t.dim() == 0 ? 1 : t.size(0);
  MF_CHECK(first_row >= 0 && first_row + n <= static_cast<int64_t>(s.written.size()), "GGUF rows of " + name + " in range");
  MF_CHECK(s.shape.size() <= 1 || std::vector<int64_t>(t.sizes().begin() + 1, t.sizes().end()) ==
                                      std::vector<int64_t>(s.shape.begin() + 1, s.shape.end()),
           "GGUF rows of " + name + " have its row shape");
  for (int64_t r = first_row; r < first_row + n; ++r) {
    MF_CHECK(!s.written[static_cast<size_t>(r)], "GGUF row of " + name + " written once");
    s.written[static_cast<size_t>(r)] = true;
  }
  const uint64_t row_bytes = n > 0 ? ggml_nbytes(s.type, static_cast<uint64_t>(t.numel() / n)) : 0;
  if (ggml_is_block_type(s.type)) {
    const std::vector<uint8_t> q = ggml_quantize(s.type, t);
    put_bytes(s.offset + static_cast<uint64_t>(first_row) * row_bytes, q.data(), q.size());
    return;
  }
  const at::Tensor d = t.detach().to(at::kCPU).to(scalar_of(s.type)).contiguous();
  put_bytes(s.offset + static_cast<uint64_t>(first_row) * row_bytes, d.data_ptr(),
            ggml_nbytes(s.type, static_cast<uint64_t>(d.numel())));
}

void GgufSink::close() {
  for (const auto& [name, s] : slots_)
    for (size_t r = 0; r < s.written.size(); ++r)
      if (!s.written[r]) throw UserError(shown_ + ": tensor '" + name + "' was not written in full (row " + std::to_string(r) + ")");
  const int fd = fd_;
  fd_ = -1;
  int err = ::fsync(fd) == 0 ? 0 : errno;
  if (::close(fd) != 0 && err == 0) err = errno;
  if (err != 0) {
    ::unlink(path_.c_str());
    throw UserError(shown_ + ": write failed: " + std::strerror(err));
  }
}

// ---- reader ----------------------------------------------------------------------------------

namespace {

struct Cursor {
  const uint8_t* p;
  uint64_t size, pos = 0;
  const std::string& path;
  [[noreturn]] void fail(const std::string& what) const {
    throw UserError(path + ": corrupt GGUF file (" + what + " at byte " + std::to_string(pos) + ")");
  }
  void need(uint64_t n) const {
    if (n > size - pos) fail("unexpected end of file");
  }
  template <class T>
  T get() {
    need(sizeof(T));
    T v;
    std::memcpy(&v, p + pos, sizeof v);
    pos += sizeof v;
    return v;
  }
  std::string str() {
    uint64_t n = get<uint64_t>();
    need(n);
    std::string s(reinterpret_cast<const char*>(p + pos), n);
    pos += n;
    return s;
  }
};

GgufValue read_value(Cursor& c, GgufType type, int depth) {
  GgufValue v;
  v.type = type;
  switch (type) {
    case GgufType::U8: v.u = c.get<uint8_t>(); break;
    case GgufType::I8: v.i = c.get<int8_t>(); break;
    case GgufType::U16: v.u = c.get<uint16_t>(); break;
    case GgufType::I16: v.i = c.get<int16_t>(); break;
    case GgufType::U32: v.u = c.get<uint32_t>(); break;
    case GgufType::I32: v.i = c.get<int32_t>(); break;
    case GgufType::F32: v.f = c.get<float>(); break;
    case GgufType::BOOL: {
      uint8_t b = c.get<uint8_t>();
      if (b > 1) c.fail("boolean value " + std::to_string(b));
      v.u = b;
      break;
    }
    case GgufType::STRING: v.s = c.str(); break;
    case GgufType::U64: v.u = c.get<uint64_t>(); break;
    case GgufType::I64: v.i = c.get<int64_t>(); break;
    case GgufType::F64: v.f = c.get<double>(); break;
    case GgufType::ARRAY: {
      if (depth > 2) c.fail("arrays nested too deeply");
      uint32_t et = c.get<uint32_t>();
      if (et > 12) c.fail("unknown array element type " + std::to_string(et));
      v.array_type = static_cast<GgufType>(et);
      uint64_t n = c.get<uint64_t>();
      // Every element takes at least one byte: a count beyond the remaining bytes is a lie.
      if (n > c.size - c.pos) c.fail("array of " + std::to_string(n) + " elements longer than the file");
      v.array.reserve(static_cast<size_t>(n));
      for (uint64_t i = 0; i < n; ++i) v.array.push_back(read_value(c, v.array_type, depth + 1));
      break;
    }
    default: c.fail("unknown value type " + std::to_string(static_cast<uint32_t>(type)));
  }
  return v;
}

}  // namespace

GgufFile GgufFile::open(const std::string& path) {
  GgufFile f;
  f.path_ = path;
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw UserError(path + ": cannot open: " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw UserError(path + ": not a regular file");
  }
  f.size_ = static_cast<size_t>(st.st_size);
  if (f.size_ < 24) {
    ::close(fd);
    throw UserError(path + ": corrupt GGUF file (shorter than its header)");
  }
  f.map_ = ::mmap(nullptr, f.size_, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (f.map_ == MAP_FAILED) {
    f.map_ = nullptr;
    throw UserError(path + ": cannot map: " + std::strerror(errno));
  }
  Cursor c{static_cast<const uint8_t*>(f.map_), f.size_, 0, path};
  if (c.get<uint32_t>() != kMagic) c.fail("bad magic; not a GGUF file");
  f.version_ = c.get<uint32_t>();
  if (f.version_ != 2 && f.version_ != 3) c.fail("unsupported version " + std::to_string(f.version_));
  uint64_t n_tensors = c.get<uint64_t>(), n_kv = c.get<uint64_t>();
  if (n_tensors > f.size_ / 8 || n_kv > f.size_ / 8) c.fail("counts larger than the file allows");
  for (uint64_t i = 0; i < n_kv; ++i) {
    std::string key = c.str();
    uint32_t t = c.get<uint32_t>();
    if (t > 12) c.fail("unknown value type " + std::to_string(t) + " for key '" + key + "'");
    if (f.kv_.count(key)) c.fail("duplicate key '" + key + "'");
    f.kv_[key] = read_value(c, static_cast<GgufType>(t), 0);
  }
  if (f.kv_.count("general.alignment")) {
    const auto& a = f.kv_["general.alignment"];
    if (a.type != GgufType::U32 || a.u == 0 || (a.u & (a.u - 1)) != 0 || a.u > 4096) c.fail("bad general.alignment");
    f.alignment_ = static_cast<uint32_t>(a.u);
  }
  std::set<std::string> names;
  for (uint64_t i = 0; i < n_tensors; ++i) {
    GgufTensorInfo t;
    t.name = c.str();
    if (!names.insert(t.name).second) c.fail("duplicate tensor '" + t.name + "'");
    uint32_t nd = c.get<uint32_t>();
    if (nd == 0 || nd > 4) c.fail("tensor '" + t.name + "' has " + std::to_string(nd) + " dimensions");
    uint64_t numel = 1;
    for (uint32_t d = 0; d < nd; ++d) {
      uint64_t x = c.get<uint64_t>();
      if (x != 0 && numel > (uint64_t{1} << 62) / x) c.fail("tensor '" + t.name + "' is impossibly large");
      numel *= x;
      t.ne.push_back(x);
    }
    uint32_t type = c.get<uint32_t>();
    if (type != 0 && type != 1 && type != 2 && type != 8 && type != 30)
      c.fail("tensor '" + t.name + "' has ggml type " + std::to_string(type) + " (only F32, F16, BF16, Q4_0, Q8_0 are read)");
    if ((type == 2 || type == 8) && t.ne[0] % kBlock != 0)
      c.fail("tensor '" + t.name + "' has rows of " + std::to_string(t.ne[0]) + " values, not whole blocks of 32");
    t.type = static_cast<GgmlType>(type);
    t.offset = c.get<uint64_t>();
    if (t.offset % f.alignment_ != 0) c.fail("tensor '" + t.name + "' is not aligned");
    t.bytes = ggml_nbytes(t.type, numel);
    f.tensors_.push_back(t);
  }
  f.data_offset_ = (c.pos + f.alignment_ - 1) / f.alignment_ * f.alignment_;
  if (f.data_offset_ > f.size_) c.fail("data section beyond the end of the file");
  const uint64_t data_size = f.size_ - f.data_offset_;
  std::vector<std::pair<uint64_t, uint64_t>> spans;
  for (const auto& t : f.tensors_) {
    if (t.offset > data_size || t.bytes > data_size - t.offset)
      throw UserError(path + ": corrupt GGUF file (tensor '" + t.name + "' extends beyond the end of the file)");
    if (t.bytes) spans.emplace_back(t.offset, t.offset + t.bytes);
  }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i)
    if (spans[i].first < spans[i - 1].second) throw UserError(path + ": corrupt GGUF file (tensor data overlaps)");
  return f;
}

GgufFile::GgufFile(GgufFile&& o) noexcept
    : path_(std::move(o.path_)), map_(o.map_), size_(o.size_), version_(o.version_), alignment_(o.alignment_),
      data_offset_(o.data_offset_), kv_(std::move(o.kv_)), tensors_(std::move(o.tensors_)) {
  o.map_ = nullptr;
}

GgufFile::~GgufFile() {
  if (map_) ::munmap(map_, size_);
}

const GgufTensorInfo& GgufFile::tensor(const std::string& name) const {
  for (const auto& t : tensors_)
    if (t.name == name) return t;
  throw UserError(path_ + ": no tensor '" + name + "'");
}

at::Tensor GgufFile::get(const std::string& name) const {
  const auto& t = tensor(name);
  std::vector<int64_t> shape(t.ne.rbegin(), t.ne.rend());
  const uint8_t* data = static_cast<const uint8_t*>(map_) + data_offset_ + t.offset;
  if (ggml_is_block_type(t.type)) return ggml_dequantize(t.type, data, shape);
  auto out = at::empty(shape, at::TensorOptions().dtype(scalar_of(t.type)));
  std::memcpy(out.data_ptr(), data, t.bytes);
  return out.to(at::kFloat);
}

}  // namespace moeforge::io
