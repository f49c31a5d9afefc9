#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"
#include "io/safetensors.h"

using moeforge::UserError;
using moeforge::io::SafetensorsFile;
using moeforge::io::write_safetensors;

namespace {

// A file under /tmp removed when the test ends.
struct TempFile {
  std::string path;
  explicit TempFile(const std::string& name)
      : path("/tmp/moeforge_test_" + std::to_string(::getpid()) + "_" + name + ".safetensors") {}
  TempFile(const std::string& name, const std::string& bytes) : TempFile(name) {
    std::ofstream(path, std::ios::binary) << bytes;
  }
  ~TempFile() { ::unlink(path.c_str()); }
};

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string le64(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  return s;
}

// A file with `header` as its JSON (unpadded) and `data_bytes` zero bytes of data.
std::string file_bytes(const std::string& header, size_t data_bytes = 0) {
  return le64(header.size()) + header + std::string(data_bytes, '\0');
}

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

// Opens `bytes` as a file and returns the UserError's message; fails the test if it opens or the
// message does not name the file.
std::string open_error(const std::string& tag, const std::string& bytes) {
  TempFile f(tag, bytes);
  try {
    SafetensorsFile::open(f.path);
  } catch (const UserError& e) {
    std::string msg = e.what();
    EXPECT_TRUE(contains(msg, f.path)) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    return msg;
  }
  ADD_FAILURE() << tag << ": opened without error";
  return "";
}

// One tensor "w" with the given entry body and `data_bytes` of data.
std::string one_entry(const std::string& entry, size_t data_bytes) {
  return file_bytes("{\"w\":" + entry + "}", data_bytes);
}

void expect_bitwise_equal(const torch::Tensor& got, const torch::Tensor& want, const std::string& name) {
  ASSERT_EQ(got.scalar_type(), want.scalar_type()) << name;
  ASSERT_EQ(got.sizes(), want.sizes()) << name;
  ASSERT_TRUE(got.device().is_cpu()) << name;
  auto w = want.contiguous();
  auto g = got.contiguous();
  if (w.numel() == 0) return;  // data_ptr may be null
  ASSERT_EQ(std::memcmp(g.data_ptr(), w.data_ptr(), w.numel() * w.element_size()), 0) << name;
}

}  // namespace

TEST(Safetensors, RoundTripIsBitwiseForEveryDtype) {
  torch::manual_seed(3);
  auto f32 = torch::randn({3, 4});
  f32[0][0] = std::numeric_limits<float>::quiet_NaN();
  f32[0][1] = -0.0f;
  std::vector<std::pair<std::string, torch::Tensor>> tensors = {
      {"f32", f32},
      {"f64", torch::randn({5}, torch::kDouble)},
      {"bf16", torch::randn({2, 3}).to(torch::kBFloat16)},
      {"f16", torch::randn({7}).to(torch::kHalf)},
      {"i64", torch::randint(-1000000000000LL, 1000000000000LL, {4}, torch::kLong)},
      {"i32", torch::randint(-100000, 100000, {2, 2}, torch::kInt)},
      {"i16", torch::randint(-300, 300, {3}, torch::kShort)},
      {"i8", torch::randint(-100, 100, {3}, torch::kChar)},
      {"u8", torch::randint(0, 255, {5}, torch::kByte)},
      {"bool", torch::randn({6}) > 0},
      {"empty", torch::empty({0, 3})},
      {"scalar", torch::tensor(2.5)},
      {"transposed", torch::randn({4, 6}).t()},
      {"strided", torch::arange(20, torch::kFloat).slice(0, 1, 20, 3)},
      {"grad", torch::randn({2}, torch::requires_grad())},
  };
  ASSERT_FALSE(tensors[12].second.is_contiguous());
  TempFile f("roundtrip");
  write_safetensors(f.path, tensors);
  auto file = SafetensorsFile::open(f.path);
  std::vector<std::string> want_names;
  for (const auto& [name, t] : tensors) want_names.push_back(name);
  EXPECT_EQ(file.names(), want_names);  // offsets follow the order given
  for (const auto& [name, t] : tensors) {
    ASSERT_TRUE(file.contains(name));
    expect_bitwise_equal(file.get(name), t.detach(), name);
  }
  EXPECT_EQ(file.entry("bf16").dtype, "BF16");
  EXPECT_EQ(file.entry("bool").dtype, "BOOL");
  EXPECT_EQ(file.entry("empty").begin, file.entry("empty").end);
  EXPECT_TRUE(file.metadata().empty());
  EXPECT_FALSE(file.contains("missing"));
}

TEST(Safetensors, SparseTensorIsWrittenDense) {
  auto dense = torch::tensor({{0.f, 1.f}, {2.f, 0.f}});
  TempFile f("sparse");
  write_safetensors(f.path, {{"s", dense.to_sparse()}});
  expect_bitwise_equal(SafetensorsFile::open(f.path).get("s"), dense, "s");
}

TEST(Safetensors, MetadataRoundTrips) {
  std::map<std::string, std::string> meta = {{"format", "pt"}, {"note", "ünïcode \"quoted\"\nline"}, {"empty", ""}};
  TempFile f("meta");
  write_safetensors(f.path, {{"x", torch::ones({2})}}, meta);
  auto file = SafetensorsFile::open(f.path);
  EXPECT_EQ(file.metadata(), meta);
  EXPECT_EQ(file.path(), f.path);
}

TEST(Safetensors, NoTensorsIsALegalFile) {
  TempFile f("none");
  write_safetensors(f.path, {});
  auto file = SafetensorsFile::open(f.path);
  EXPECT_TRUE(file.names().empty());
  EXPECT_EQ(read_bytes(f.path).size() % 8, 0u);
}

// Reads the written bytes by hand, independently of SafetensorsFile.
TEST(Safetensors, ByteLayoutMatchesTheFormat) {
  auto a = torch::tensor({{1.5f, -2.f}, {3.25f, 1e-3f}});
  auto b = torch::tensor({7, -8, 9}, torch::kLong);
  TempFile f("layout");
  write_safetensors(f.path, {{"a", a}, {"b", b}}, {{"k", "v"}});
  std::string bytes = read_bytes(f.path);
  ASSERT_GE(bytes.size(), 8u);
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(static_cast<uint8_t>(bytes[i])) << (8 * i);
  EXPECT_EQ((8 + n) % 8, 0u) << "data section must start 8-byte aligned";
  ASSERT_EQ(bytes.size(), 8 + n + 16 + 24);
  std::string json_text = bytes.substr(8, n);
  auto last = json_text.find_last_not_of(' ');
  EXPECT_EQ(json_text[last], '}') << "padding must be spaces after the object";
  auto header = nlohmann::json::parse(json_text);
  EXPECT_EQ(header["a"]["dtype"], "F32");
  EXPECT_EQ(header["a"]["shape"], nlohmann::json({2, 2}));
  EXPECT_EQ(header["a"]["data_offsets"], nlohmann::json({0, 16}));
  EXPECT_EQ(header["b"]["dtype"], "I64");
  EXPECT_EQ(header["b"]["shape"], nlohmann::json({3}));
  EXPECT_EQ(header["b"]["data_offsets"], nlohmann::json({16, 40}));
  EXPECT_EQ(header["__metadata__"], nlohmann::json({{"k", "v"}}));
  const char* data = bytes.data() + 8 + n;
  float fa[4];
  std::memcpy(fa, data, sizeof fa);
  EXPECT_EQ(fa[0], 1.5f);
  EXPECT_EQ(fa[1], -2.f);
  EXPECT_EQ(fa[2], 3.25f);
  EXPECT_EQ(fa[3], 1e-3f);
  int64_t ib[3];
  std::memcpy(ib, data + 16, sizeof ib);
  EXPECT_EQ(ib[0], 7);
  EXPECT_EQ(ib[1], -8);
  EXPECT_EQ(ib[2], 9);
}

// A file written by hand (unpadded header, keys out of offset order) reads back.
TEST(Safetensors, ReadsAHandWrittenFile) {
  float v[2] = {1.5f, -2.f};
  std::string data(reinterpret_cast<const char*>(v), sizeof v);
  data += std::string("\x02\x00\x01", 3);
  std::string header =
      R"({"z":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"BOOL","shape":[3],"data_offsets":[8,11]}})";
  TempFile f("handwritten", le64(header.size()) + header + data);
  auto file = SafetensorsFile::open(f.path);
  EXPECT_EQ(file.names(), (std::vector<std::string>{"z", "a"}));
  expect_bitwise_equal(file.get("z"), torch::tensor({1.5f, -2.f}), "z");
  // Any non-zero byte is true, and comes back as a proper 1.
  expect_bitwise_equal(file.get("a"), torch::tensor({true, false, true}), "a");
}

TEST(Safetensors, IsMovableAndTensorsOutliveIt) {
  TempFile f("move");
  write_safetensors(f.path, {{"x", torch::arange(4, torch::kFloat)}});
  auto a = SafetensorsFile::open(f.path);
  SafetensorsFile b(std::move(a));
  auto c = SafetensorsFile::open(f.path);
  c = std::move(b);
  torch::Tensor x;
  {
    SafetensorsFile d(std::move(c));
    x = d.get("x");
  }
  expect_bitwise_equal(x, torch::arange(4, torch::kFloat), "x");
}

TEST(Safetensors, MissingTensorNamesFileAndTensor) {
  TempFile f("missing_tensor");
  write_safetensors(f.path, {{"model.norm.weight", torch::ones({2})}});
  auto file = SafetensorsFile::open(f.path);
  try {
    file.get("model.norm.weigth");
    FAIL() << "no error";
  } catch (const UserError& e) {
    std::string msg = e.what();
    EXPECT_TRUE(contains(msg, f.path)) << msg;
    EXPECT_TRUE(contains(msg, "model.norm.weigth")) << msg;
    EXPECT_TRUE(contains(msg, "did you mean 'model.norm.weight'")) << msg;
  }
}

TEST(Safetensors, MissingFileOrDirectoryIsAUserError) {
  EXPECT_THROW(SafetensorsFile::open("/nonexistent/moeforge.safetensors"), UserError);
  EXPECT_THROW(SafetensorsFile::open("/tmp"), UserError);
  EXPECT_THROW(write_safetensors("/nonexistent/dir/out.safetensors", {}), UserError);
}

TEST(Safetensors, WriterRejectsUnsupportedDtypeAndDuplicateNames) {
  TempFile f("writer_errors");
  EXPECT_THROW(write_safetensors(f.path, {{"c", torch::zeros({2}, torch::kComplexFloat)}}), UserError);
  EXPECT_THROW(write_safetensors(f.path, {{"a", torch::ones({1})}, {"a", torch::ones({1})}}), UserError);
  EXPECT_THROW(write_safetensors(f.path, {{"__metadata__", torch::ones({1})}}), UserError);
}

// ---- corrupt files: each check fires with a UserError naming the file ----

TEST(SafetensorsCorrupt, ShorterThan8Bytes) {
  EXPECT_TRUE(contains(open_error("empty", ""), "too short"));
  EXPECT_TRUE(contains(open_error("short", "\x02\x00\x00\x00\x00"), "too short"));
}

TEST(SafetensorsCorrupt, HeaderLengthBeyondFile) {
  EXPECT_TRUE(contains(open_error("hdr_beyond", le64(1000) + "{}"), "exceeds the file size"));
  EXPECT_TRUE(contains(open_error("hdr_huge", le64(~0ull)), "exceeds"));
}

TEST(SafetensorsCorrupt, HeaderLengthOver100MiB) {
  // A sparse file big enough that only the 100 MiB cap can reject it.
  const uint64_t n = (100ull << 20) + 8;
  TempFile f("hdr_cap", le64(n));
  ASSERT_EQ(::truncate(f.path.c_str(), static_cast<off_t>(8 + n + 16)), 0);
  try {
    SafetensorsFile::open(f.path);
    FAIL() << "no error";
  } catch (const UserError& e) {
    std::string msg = e.what();
    EXPECT_TRUE(contains(msg, f.path)) << msg;
    EXPECT_TRUE(contains(msg, "100 MiB")) << msg;
  }
}

TEST(SafetensorsCorrupt, HeaderNotJson) {
  EXPECT_TRUE(contains(open_error("not_json", file_bytes("{\"w\": nope")), "not valid JSON"));
  EXPECT_TRUE(contains(open_error("zero_len", file_bytes("")), "not valid JSON"));
  EXPECT_TRUE(contains(open_error("bad_utf8", file_bytes("{\"\xff\":1}")), "not valid JSON"));
}

TEST(SafetensorsCorrupt, HeaderNotAnObject) {
  EXPECT_TRUE(contains(open_error("array", file_bytes("[1, 2]")), "not a JSON object"));
  EXPECT_TRUE(contains(open_error("string", file_bytes("\"x\"")), "not a JSON object"));
}

TEST(SafetensorsCorrupt, DuplicateKey) {
  auto msg = open_error("dup", file_bytes(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                                          R"("w":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})",
                                          2));
  EXPECT_TRUE(contains(msg, "twice")) << msg;
}

TEST(SafetensorsCorrupt, EntryNotAnObject) {
  auto msg = open_error("entry_num", one_entry("5", 0));
  EXPECT_TRUE(contains(msg, "'w'") && contains(msg, "not a JSON object")) << msg;
}

TEST(SafetensorsCorrupt, DtypeMissingOrIllTyped) {
  for (auto entry : {R"({"shape":[1],"data_offsets":[0,4]})", R"({"dtype":7,"shape":[1],"data_offsets":[0,4]})"}) {
    auto msg = open_error("dtype", one_entry(entry, 4));
    EXPECT_TRUE(contains(msg, "'w'") && contains(msg, "'dtype'")) << msg;
  }
}

TEST(SafetensorsCorrupt, ShapeMissingOrIllTyped) {
  for (auto entry : {R"({"dtype":"F32","data_offsets":[0,4]})", R"({"dtype":"F32","shape":1,"data_offsets":[0,4]})",
                     R"({"dtype":"F32","shape":[1.0],"data_offsets":[0,4]})",
                     R"({"dtype":"F32","shape":["1"],"data_offsets":[0,4]})",
                     R"({"dtype":"F32","shape":[18446744073709551615],"data_offsets":[0,4]})"}) {
    auto msg = open_error("shape", one_entry(entry, 4));
    EXPECT_TRUE(contains(msg, "'w'") && contains(msg, "'shape'")) << msg;
  }
}

TEST(SafetensorsCorrupt, DataOffsetsMissingOrIllTyped) {
  for (auto entry : {R"({"dtype":"F32","shape":[1]})", R"({"dtype":"F32","shape":[1],"data_offsets":[0]})",
                     R"({"dtype":"F32","shape":[1],"data_offsets":[0,4,8]})",
                     R"({"dtype":"F32","shape":[1],"data_offsets":[0,"4"]})",
                     R"({"dtype":"F32","shape":[1],"data_offsets":[-4,0]})",
                     R"({"dtype":"F32","shape":[1],"data_offsets":{"begin":0}})"}) {
    auto msg = open_error("offsets", one_entry(entry, 4));
    EXPECT_TRUE(contains(msg, "'w'") && contains(msg, "'data_offsets'")) << msg;
  }
}

TEST(SafetensorsCorrupt, UnknownDtype) {
  auto msg = open_error("dtype_unknown", one_entry(R"({"dtype":"F8_E4M3","shape":[4],"data_offsets":[0,4]})", 4));
  EXPECT_TRUE(contains(msg, "'w'") && contains(msg, "unknown dtype 'F8_E4M3'")) << msg;
}

TEST(SafetensorsCorrupt, NegativeDimension) {
  auto msg = open_error("neg_dim", one_entry(R"({"dtype":"F32","shape":[-1, 2],"data_offsets":[0,0]})", 0));
  EXPECT_TRUE(contains(msg, "'w'") && contains(msg, "negative dimension -1")) << msg;
}

TEST(SafetensorsCorrupt, BeginAfterEnd) {
  auto msg = open_error("begin_end", one_entry(R"({"dtype":"U8","shape":[0],"data_offsets":[4,2]})", 8));
  EXPECT_TRUE(contains(msg, "'w'") && contains(msg, "begin 4 > end 2")) << msg;
}

TEST(SafetensorsCorrupt, EndBeyondDataSection) {
  auto msg = open_error("end_beyond", one_entry(R"({"dtype":"F32","shape":[4],"data_offsets":[0,16]})", 12));
  EXPECT_TRUE(contains(msg, "'w'") && contains(msg, "beyond the data section")) << msg;
  msg = open_error("end_huge", one_entry(R"({"dtype":"U8","shape":[1],"data_offsets":[18446744073709551614,18446744073709551615]})", 4));
  EXPECT_TRUE(contains(msg, "beyond the data section")) << msg;
}

TEST(SafetensorsCorrupt, SizeDoesNotMatchShape) {
  auto msg = open_error("size", one_entry(R"({"dtype":"F32","shape":[2,2],"data_offsets":[0,12]})", 16));
  EXPECT_TRUE(contains(msg, "'w'") && contains(msg, "needs 16 bytes but data_offsets span 12")) << msg;
}

TEST(SafetensorsCorrupt, ShapeOverflowsItsByteCount) {
  // 2^32 * 2^32 wraps to 0 in 64 bits, which would "match" an empty span without the overflow check.
  for (auto entry : {R"({"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,0]})",
                     R"({"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,0]})",
                     R"({"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,0]})"}) {
    auto msg = open_error("overflow", one_entry(entry, 0));
    EXPECT_TRUE(contains(msg, "'w'") && contains(msg, "too large")) << msg;
  }
}

TEST(SafetensorsCorrupt, OverlappingSpans) {
  auto msg = open_error("overlap", file_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                              R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                                              12));
  EXPECT_TRUE(contains(msg, "'b'") && contains(msg, "overlaps tensor 'a'")) << msg;
  // The same span twice under two names is an overlap too.
  msg = open_error("alias", file_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                       R"("b":{"dtype":"I32","shape":[2],"data_offsets":[0,8]}})",
                                       8));
  EXPECT_TRUE(contains(msg, "overlaps")) << msg;
}

TEST(SafetensorsCorrupt, MetadataNotAStringMap) {
  EXPECT_TRUE(contains(open_error("meta_array", file_bytes(R"({"__metadata__":["a"]})")), "'__metadata__'"));
  EXPECT_TRUE(contains(open_error("meta_value", file_bytes(R"({"__metadata__":{"k":1}})")), "key 'k'"));
  EXPECT_TRUE(contains(open_error("meta_null", file_bytes(R"({"__metadata__":{"k":null}})")), "not a string"));
}

TEST(SafetensorsCorrupt, ControlCharactersInNamesStayOnOneLine) {
  auto msg = open_error("ctrl", file_bytes("{\"bad\\nname\":5}"));
  EXPECT_TRUE(contains(msg, "bad\\x0aname")) << msg;
}
