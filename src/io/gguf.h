// GGUF v3 (llama.cpp's file format): a writer, and a validating, memory-mapped reader.
// Layout: "GGUF" | u32 version | u64 tensor_count | u64 kv_count | key-values | tensor infos |
// padding to `general.alignment` (32) | tensor data (each tensor aligned). Strings are u64 length + bytes.
// Tensor dims are written fastest-first (ggml's ne[]): a row-major [rows, cols] tensor has ne = [cols, rows].
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <string>
#include <variant>
#include <vector>

namespace moeforge::io {

enum class GgufType : uint32_t {
  U8 = 0, I8 = 1, U16 = 2, I16 = 3, U32 = 4, I32 = 5, F32 = 6, BOOL = 7, STRING = 8, ARRAY = 9,
  U64 = 10, I64 = 11, F64 = 12
};
// Q4_0 and Q8_0: llama.cpp's blocks of 32 values along the innermost dimension, each an fp16 scale d and
// 32 4-bit (x = (q - 8) d, two per byte: the block's first 16 values in the low nibbles, the last 16 in the
// high) or 8-bit (x = q d) integers; quantized as ggml's reference quantize_row_q4_0 / q8_0 do (io/gguf.cpp).
enum class GgmlType : uint32_t { F32 = 0, F16 = 1, Q4_0 = 2, Q8_0 = 8, BF16 = 30 };

// Bytes of `numel` values of type t (a multiple of the block size for the block types).
uint64_t ggml_nbytes(GgmlType t, uint64_t numel);
bool ggml_is_block_type(GgmlType t);
// Rows [n, 32 k] of floats as blocks (ggml's reference quantizer, bit for bit) and back.
std::vector<uint8_t> ggml_quantize(GgmlType t, const at::Tensor& rows);
at::Tensor ggml_dequantize(GgmlType t, const uint8_t* data, const std::vector<int64_t>& shape);

struct GgufValue {
  GgufType type = GgufType::U32;
  GgufType array_type = GgufType::U32;  // for ARRAY
  uint64_t u = 0;                        // unsigned / bool
  int64_t i = 0;
  double f = 0;
  std::string s;
  std::vector<GgufValue> array;
};

// The data of a GGUF file being written (GgufWriter::start): the header is on disk, each tensor's data region
// is reserved at its offset, and the data arrive in pieces, in any order, one piece held at a time.
class GgufSink {
 public:
  GgufSink(GgufSink&&) noexcept;
  GgufSink(const GgufSink&) = delete;
  ~GgufSink();  // an unclosed sink's file is removed
  // Writes `rows` (converted to the tensor's type) as rows [first_row, first_row + rows.size(0)) of tensor
  // `name`'s outermost dimension. A row written twice, out of range or of the wrong shape is an MF_CHECK.
  void put(const std::string& name, int64_t first_row, const at::Tensor& rows);
  // Checks that every row of every tensor was written (UserError naming the first that was not), flushes and
  // closes the file. A failed write (disk full) is a UserError naming the file.
  void close();

 private:
  friend class GgufWriter;
  struct Slot {
    std::vector<int64_t> shape;
    GgmlType type;
    uint64_t offset;              // absolute, in the file
    std::vector<bool> written;    // per outermost row
  };
  GgufSink() = default;
  void put_bytes(uint64_t at, const void* data, uint64_t n);
  std::string path_, shown_;
  int fd_ = -1;
  std::map<std::string, Slot> slots_;
};

class GgufWriter {
 public:
  void add_u32(const std::string& key, uint32_t v);
  void add_i32(const std::string& key, int32_t v);
  void add_f32(const std::string& key, float v);
  void add_bool(const std::string& key, bool v);
  void add_string(const std::string& key, const std::string& v);
  void add_string_array(const std::string& key, const std::vector<std::string>& v);
  void add_f32_array(const std::string& key, const std::vector<float>& v);
  void add_i32_array(const std::string& key, const std::vector<int32_t>& v);
  // A row-major tensor (converted to `type`); dims are reversed into ggml order on write.
  void add_tensor(const std::string& name, const at::Tensor& t, GgmlType type);
  // A tensor of `shape` whose data are given later, through the sink start() returns.
  void declare_tensor(const std::string& name, const std::vector<int64_t>& shape, GgmlType type);
  // Writes everything (every tensor added with its data) to `path`.
  void write(const std::string& path, uint32_t alignment = 32) const;
  // Creates `path` with the header (and the data of tensors added with it): the declared tensors' data go
  // through the returned sink.
  // `shown`: the name errors give the file (the final path of a file written under a temp name).
  GgufSink start(const std::string& path, uint32_t alignment = 32, const std::string& shown = "") const;

 private:
  struct Tensor {
    std::string name;
    std::vector<int64_t> shape;  // row-major
    GgmlType type;
    at::Tensor data;             // as given (undefined: declared, given later through the sink)
  };
  std::vector<std::pair<std::string, GgufValue>> kv_;
  std::vector<Tensor> tensors_;
};

struct GgufTensorInfo {
  std::string name;
  std::vector<uint64_t> ne;  // ggml order (fastest first)
  GgmlType type;
  uint64_t offset;           // relative to the data section
  uint64_t bytes;
};

class GgufFile {
 public:
  // Validates everything (magic, version, counts, strings, arrays, dims, types, alignment, spans);
  // a bad file is a UserError naming it.
  static GgufFile open(const std::string& path);
  GgufFile(GgufFile&&) noexcept;
  GgufFile(const GgufFile&) = delete;
  ~GgufFile();
  uint32_t version() const { return version_; }
  uint32_t alignment() const { return alignment_; }
  const std::map<std::string, GgufValue>& kv() const { return kv_; }
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  const GgufTensorInfo& tensor(const std::string& name) const;
  // A copy as a row-major fp32 tensor (shape = reversed ne).
  at::Tensor get(const std::string& name) const;
  uint64_t data_offset() const { return data_offset_; }

 private:
  GgufFile() = default;
  std::string path_;
  void* map_ = nullptr;
  size_t size_ = 0;
  uint32_t version_ = 0, alignment_ = 32;
  uint64_t data_offset_ = 0;
  std::map<std::string, GgufValue> kv_;
  std::vector<GgufTensorInfo> tensors_;
};

}  // namespace moeforge::io
