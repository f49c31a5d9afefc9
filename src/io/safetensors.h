// Hugging Face safetensors: an 8-byte little-endian header length N, N bytes of JSON header
// ({"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {..}}), then the data;
// offsets are relative to the start of the data section. Files come from strangers, so `open`
// validates the whole header before any tensor is read: a bad file is a UserError naming it.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace moeforge::io {

struct TensorEntry {
  std::string name;
  std::string dtype;  // safetensors spelling: "F32", "BF16", ...
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // byte span within the data section
};

// Writes `tensors` (any device or layout: moved to CPU, densified and made contiguous) in the given
// order, with `metadata`; the data section starts 8-byte aligned (the header is padded with spaces).
// Writes `path` in place and fsyncs it; callers wanting atomicity write a temp file and rename. A failed write
// (ENOSPC, EFBIG, EIO) is a UserError "<path>: write failed: <reason>" and removes the partial file.
void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// A read-only memory mapping of a validated safetensors file. Movable, not copyable.
class SafetensorsFile {
 public:
  static SafetensorsFile open(const std::string& path);

  SafetensorsFile(SafetensorsFile&& other) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&& other) noexcept;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;
  ~SafetensorsFile();

  std::vector<std::string> names() const;  // in file order of offsets
  bool contains(const std::string& name) const;
  const TensorEntry& entry(const std::string& name) const;  // UserError naming file and tensor if absent
  at::Tensor get(const std::string& name) const;             // an owning CPU tensor copied out of the mapping
  // Rows [first, first + count) of dim 0 only (an expert's slice of a fused [E, ...] tensor): only their bytes
  // are read. UserError if the tensor is a scalar or the rows are out of range.
  at::Tensor get_rows(const std::string& name, int64_t first, int64_t count) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::string& path() const { return path_; }

 private:
  SafetensorsFile() = default;
  void release() noexcept;
  at::Tensor copy_out(const TensorEntry& e, std::vector<int64_t> shape, uint64_t begin, uint64_t end) const;

  std::string path_;
  void* map_ = nullptr;  // the whole file
  size_t map_size_ = 0;
  const uint8_t* data_ = nullptr;  // start of the data section, inside map_
  std::map<std::string, TensorEntry> entries_;
  std::vector<std::string> order_;  // names sorted by offset
  std::map<std::string, std::string> metadata_;
};

// The dtypes both sides know: F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL. Anything else is a UserError.
at::ScalarType safetensors_dtype_to_scalar(const std::string& dtype);
std::string scalar_to_safetensors_dtype(at::ScalarType t);

}  // namespace moeforge::io
