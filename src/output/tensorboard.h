// TensorBoard event-file writer. The format is small (TFRecord framing around
// a few protobuf fields), so it is encoded by hand: no protobuf or TensorFlow
// dependency, and no LibTorch either, so metrics sinks stay cheap to build.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>

namespace moeforge::train {

// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as TFRecord uses.
uint32_t crc32c(const uint8_t* data, size_t n);

// TFRecord's masked CRC: ((crc >> 15) | (crc << 17)) + 0xa282ead8. Masking keeps
// a CRC of data that itself contains CRCs from being trivially predictable.
uint32_t masked_crc32c(const uint8_t* data, size_t n);

// Appends scalar summaries to "<logdir>/events.out.tfevents.<unix seconds>.<hostname>.<pid>".
// Records are buffered; flush() (or destruction) makes them visible to TensorBoard.
class TensorBoardWriter {
 public:
  // Creates logdir if missing and writes the file_version header event.
  // Throws UserError naming the path when the directory or file cannot be created.
  explicit TensorBoardWriter(const std::string& logdir);
  ~TensorBoardWriter();
  TensorBoardWriter(const TensorBoardWriter&) = delete;
  TensorBoardWriter& operator=(const TensorBoardWriter&) = delete;

  // One Event{wall_time, step, summary{value{tag, simple_value}}}; TensorBoard
  // stores scalars as float, so `value` is narrowed here.
  void add_scalar(const std::string& tag, double value, int64_t step);
  void flush();
  const std::string& path() const { return path_; }

 private:
  void write_record(const std::string& data);

  std::string path_;
  std::FILE* file_ = nullptr;
};

}  // namespace moeforge::train
