// The event file is read back with a parser written here, independent of the
// writer (bitwise CRC, hand-rolled protobuf decoding), so a bug shared by
// encoder and decoder cannot hide. No LibTorch: this test builds in seconds.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "core/error.h"
#include "output/tensorboard.h"

namespace fs = std::filesystem;
using moeforge::train::crc32c;
using moeforge::train::masked_crc32c;
using moeforge::train::TensorBoardWriter;

namespace {

uint32_t naive_crc32c(const uint8_t* p, size_t n) {
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) {
    c ^= p[i];
    for (int bit = 0; bit < 8; ++bit) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
  }
  return ~c;
}

uint32_t naive_masked(const uint8_t* p, size_t n) {
  uint32_t c = naive_crc32c(p, n);
  return ((c >> 15) | (c << 17)) + 0xa282ead8u;
}

uint64_t read_le(const uint8_t* p, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v |= uint64_t(p[i]) << (8 * i);
  return v;
}

// A protobuf reader over one message's bytes.
struct Reader {
  const uint8_t* p;
  const uint8_t* end;
  bool done() const { return p >= end; }
  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0;; shift += 7) {
      if (p >= end || shift > 63) throw std::runtime_error("bad varint");
      uint8_t b = *p++;
      v |= uint64_t(b & 0x7F) << shift;
      if (!(b & 0x80)) return v;
    }
  }
  uint64_t fixed(int bytes) {
    if (end - p < bytes) throw std::runtime_error("truncated fixed field");
    uint64_t v = read_le(p, bytes);
    p += bytes;
    return v;
  }
  std::string bytes() {
    uint64_t n = varint();
    if (uint64_t(end - p) < n) throw std::runtime_error("truncated bytes field");
    std::string s(reinterpret_cast<const char*>(p), n);
    p += n;
    return s;
  }
};

struct ScalarValue {
  std::string tag;
  float value = 0;
};

struct Event {
  double wall_time = 0;
  int64_t step = 0;
  std::string file_version;
  std::vector<ScalarValue> values;
};

ScalarValue parse_value(const std::string& msg) {
  ScalarValue v;
  Reader r{reinterpret_cast<const uint8_t*>(msg.data()), reinterpret_cast<const uint8_t*>(msg.data()) + msg.size()};
  while (!r.done()) {
    uint64_t key = r.varint();
    if (key == ((1 << 3) | 2)) {
      v.tag = r.bytes();
    } else if (key == ((2 << 3) | 5)) {
      uint32_t bits = uint32_t(r.fixed(4));
      std::memcpy(&v.value, &bits, 4);
    } else {
      ADD_FAILURE() << "unexpected Summary.Value key " << key;
      return v;
    }
  }
  return v;
}

Event parse_event(const std::string& msg) {
  Event e;
  Reader r{reinterpret_cast<const uint8_t*>(msg.data()), reinterpret_cast<const uint8_t*>(msg.data()) + msg.size()};
  while (!r.done()) {
    uint64_t key = r.varint();
    if (key == ((1 << 3) | 1)) {
      uint64_t bits = r.fixed(8);
      std::memcpy(&e.wall_time, &bits, 8);
    } else if (key == ((2 << 3) | 0)) {
      e.step = int64_t(r.varint());
    } else if (key == ((3 << 3) | 2)) {
      e.file_version = r.bytes();
    } else if (key == ((5 << 3) | 2)) {
      std::string summary = r.bytes();
      Reader s{reinterpret_cast<const uint8_t*>(summary.data()),
               reinterpret_cast<const uint8_t*>(summary.data()) + summary.size()};
      while (!s.done()) {
        uint64_t skey = s.varint();
        if (skey != ((1 << 3) | 2)) {
          ADD_FAILURE() << "unexpected Summary key " << skey;
          return e;
        }
        e.values.push_back(parse_value(s.bytes()));
      }
    } else {
      ADD_FAILURE() << "unexpected Event key " << key;
      return e;
    }
  }
  return e;
}

// Splits a TFRecord file into records, checking both CRCs of each.
std::vector<std::string> read_records(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in) << path;
  std::string buf((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const auto* p = reinterpret_cast<const uint8_t*>(buf.data());
  size_t pos = 0;
  std::vector<std::string> records;
  while (pos < buf.size()) {
    if (buf.size() - pos < 12) {
      ADD_FAILURE() << "truncated record header at " << pos;
      break;
    }
    uint64_t len = read_le(p + pos, 8);
    EXPECT_EQ(read_le(p + pos + 8, 4), naive_masked(p + pos, 8)) << "length CRC at " << pos;
    pos += 12;
    if (buf.size() - pos < len + 4) {
      ADD_FAILURE() << "truncated record data at " << pos;
      break;
    }
    EXPECT_EQ(read_le(p + pos + len, 4), naive_masked(p + pos, len)) << "data CRC at " << pos;
    records.emplace_back(buf.data() + pos, len);
    pos += len + 4;
  }
  return records;
}

// A fresh directory under the system temp dir, removed afterwards.
struct TempDir {
  fs::path path;
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "moeforge_tb_XXXXXX").string();
    if (!mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
    path = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

}  // namespace

TEST(TensorBoard, Crc32cStandardVector) {
  const std::string s = "123456789";
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  EXPECT_EQ(crc32c(p, s.size()), 0xE3069283u);
  EXPECT_EQ(naive_crc32c(p, s.size()), 0xE3069283u);
  EXPECT_EQ(crc32c(p, 0), 0u);
  EXPECT_EQ(masked_crc32c(p, s.size()), naive_masked(p, s.size()));
}

TEST(TensorBoard, Crc32cMatchesBitwiseReference) {
  std::vector<uint8_t> data(1000);
  uint32_t x = 12345;
  for (auto& b : data) b = uint8_t((x = x * 1103515245u + 12345u) >> 16);
  for (size_t n : {1, 7, 8, 255, 1000}) {
    EXPECT_EQ(crc32c(data.data(), n), naive_crc32c(data.data(), n)) << n;
    EXPECT_EQ(masked_crc32c(data.data(), n), naive_masked(data.data(), n)) << n;
  }
}

TEST(TensorBoard, ScalarsRoundTrip) {
  TempDir tmp;
  const fs::path logdir = tmp.path / "runs" / "a";  // nested and missing: the writer creates it
  const std::string long_tag = "loss/" + std::string(200, 'x');  // length varint needs two bytes
  struct Expected {
    std::string tag;
    double value;
    int64_t step;
  };
  const std::vector<Expected> expected = {
      {"train/loss", 2.718281828459045, 0},
      {"train/lr", 3e-4, 1},
      {"train/aux_loss", -1.5, 1000},
      {long_tag, 1e-8, int64_t(1) << 40},
      {"eval/negative_step", 42.0, -3},
  };
  const double before = now_seconds();
  std::string path;
  {
    TensorBoardWriter w(logdir.string());
    path = w.path();
    for (const auto& e : expected) w.add_scalar(e.tag, e.value, e.step);
    w.flush();
  }
  const double after = now_seconds();

  EXPECT_EQ(fs::path(path).parent_path(), logdir);
  EXPECT_EQ(fs::path(path).filename().string().rfind("events.out.tfevents.", 0), 0u) << path;

  auto records = read_records(path);
  ASSERT_EQ(records.size(), expected.size() + 1);

  Event header = parse_event(records[0]);
  EXPECT_EQ(header.file_version, "brain.Event:2");
  EXPECT_TRUE(header.values.empty());
  EXPECT_GE(header.wall_time, before - 1);
  EXPECT_LE(header.wall_time, after + 1);

  for (size_t i = 0; i < expected.size(); ++i) {
    Event e = parse_event(records[i + 1]);
    EXPECT_EQ(e.step, expected[i].step) << i;
    EXPECT_TRUE(e.file_version.empty()) << i;
    EXPECT_GE(e.wall_time, before - 1) << i;
    EXPECT_LE(e.wall_time, after + 1) << i;
    ASSERT_EQ(e.values.size(), 1u) << i;
    EXPECT_EQ(e.values[0].tag, expected[i].tag) << i;
    EXPECT_EQ(e.values[0].value, static_cast<float>(expected[i].value)) << i;
  }
}

TEST(TensorBoard, DestructorFlushes) {
  TempDir tmp;
  std::string path;
  {
    TensorBoardWriter w(tmp.path.string());
    path = w.path();
    w.add_scalar("x", 0.5, 7);
  }
  auto records = read_records(path);
  ASSERT_EQ(records.size(), 2u);
  Event e = parse_event(records[1]);
  EXPECT_EQ(e.step, 7);
  ASSERT_EQ(e.values.size(), 1u);
  EXPECT_EQ(e.values[0].value, 0.5f);
}

TEST(TensorBoard, TwoWritersInOneDirectoryDoNotClobber) {
  TempDir tmp;
  TensorBoardWriter a(tmp.path.string());
  TensorBoardWriter b(tmp.path.string());
  EXPECT_NE(a.path(), b.path());
  a.add_scalar("a", 1.0, 1);
  b.add_scalar("b", 2.0, 1);
  a.flush();
  b.flush();
  EXPECT_EQ(read_records(a.path()).size(), 2u);
  EXPECT_EQ(read_records(b.path()).size(), 2u);
}

TEST(TensorBoard, UnwritableLogdirThrowsUserError) {
  TempDir tmp;
  const fs::path file = tmp.path / "not_a_dir";
  std::ofstream(file) << "x";
  const std::string logdir = (file / "runs").string();
  try {
    TensorBoardWriter w(logdir);
    FAIL() << "expected UserError for " << logdir;
  } catch (const moeforge::UserError& e) {
    EXPECT_NE(std::string(e.what()).find(logdir), std::string::npos) << e.what();
  }
}
