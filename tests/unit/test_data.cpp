#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <set>

#include "core/error.h"
#include "corpus.h"
#include "data/lm_dataset.h"
#include "data/prepare.h"
#include "data/text_source.h"
#include "data/token_shard.h"
#include "data/tokenizer.h"

using namespace moeforge;
using namespace moeforge::data;
namespace fs = std::filesystem;

namespace {
std::vector<int64_t> doc_tokens(const TokenShard& s, uint64_t d) {
  std::vector<int64_t> t(s.doc_length(d));
  s.copy_tokens(s.doc_begin(d), t.size(), t.data());
  return t;
}
std::string bytes_of(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}
}  // namespace

TEST(Tokenizer, TrainsWithMistralSpecialIdsAndRoundTrips) {
  test::TempDir dir("tok");
  test::make_prepared(dir, 60);
  Tokenizer tok(dir / "tok/tokenizer.model");
  EXPECT_EQ(tok.vocab_size(), 320);
  EXPECT_EQ(tok.unk_id(), 0);
  EXPECT_EQ(tok.bos_id(), 1);
  EXPECT_EQ(tok.eos_id(), 2);
  EXPECT_EQ(tok.piece(1), "<s>");
  EXPECT_EQ(tok.piece(2), "</s>");
  EXPECT_TRUE(tok.is_byte(3));  // byte fallback pieces follow the specials
  // Byte fallback: characters never seen in training still round-trip.
  for (std::string s : {"The cat sees the moon.", "Zebra & quantum: 42% (ünïcödé) 日本"}) {
    auto ids = tok.encode(s);
    EXPECT_FALSE(ids.empty());
    for (int id : ids) EXPECT_NE(id, tok.unk_id()) << s;
    EXPECT_EQ(tok.decode(ids), s);
  }
}

TEST(Tokenizer, MissingOrInvalidModelIsUserError) {
  EXPECT_THROW(Tokenizer("/nonexistent/tokenizer.model"), UserError);
  test::TempDir dir("badtok");
  std::ofstream(dir / "junk.model") << "not a model";
  try {
    Tokenizer t(dir / "junk.model");
    FAIL();
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("junk.model"), std::string::npos);
  }
}

TEST(Prepare, RoundTripTextShardsTokensText) {
  test::TempDir dir("prep");
  auto docs = test::make_documents(120);
  std::string data_dir = test::make_prepared(dir, 120, 0.1);
  Tokenizer tok(data_dir + "/tokenizer.model");
  PreparedMeta meta = read_prepared_meta(data_dir);
  EXPECT_EQ(meta.token_bytes, 2);  // 320 pieces fit in uint16
  EXPECT_EQ(meta.train_docs + meta.val_docs, 120);
  EXPECT_EQ(meta.val_docs, 12);    // round(0.1 * 120)
  EXPECT_EQ(meta.domains, (std::vector<std::string>{"alpha", "beta", "gamma"}));
  // Every original document comes back exactly once, whole, with its domain.
  std::multiset<std::string> original, restored;
  for (auto& [t, d] : docs) original.insert(d + "|" + t);
  int64_t tokens = 0;
  for (std::string split : {"train", "val"}) {
    TokenDataset ds(data_dir, split);
    for (size_t s = 0; s < ds.num_shards(); ++s) {
      const auto& sh = ds.shard(s);
      for (uint64_t d = 0; d < sh.num_docs(); ++d) {
        auto t64 = doc_tokens(sh, d);
        std::vector<int> ids(t64.begin(), t64.end());
        restored.insert(meta.domains[sh.doc_domain(d)] + "|" + tok.decode(ids));
        tokens += static_cast<int64_t>(ids.size());
      }
    }
  }
  EXPECT_EQ(original, restored);
  EXPECT_EQ(tokens, meta.train_tokens + meta.val_tokens);
}

TEST(Prepare, SplitIsDeterministicForASeed) {
  auto a = choose_validation(100, 0.2, 5), b = choose_validation(100, 0.2, 5), c = choose_validation(100, 0.2, 6);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  EXPECT_EQ(std::count(a.begin(), a.end(), true), 20);
  auto small = choose_validation(3, 0.01, 1), single = choose_validation(1, 0.5, 1);
  EXPECT_EQ(std::count(small.begin(), small.end(), true), 1);  // at least one when the fraction is > 0
  EXPECT_EQ(std::count(single.begin(), single.end(), true), 0);  // never every document
  // Two prepares with one seed give identical bytes.
  test::TempDir d1("det1"), d2("det2");
  test::make_prepared(d1, 60, 0.2, 3);
  test::make_prepared(d2, 60, 0.2, 3);
  EXPECT_EQ(bytes_of(d1 / "data/train-00000.bin"), bytes_of(d2 / "data/train-00000.bin"));
  EXPECT_EQ(bytes_of(d1 / "data/val-00000.bin"), bytes_of(d2 / "data/val-00000.bin"));
}

TEST(Shards, Uint32TokensAndValidation) {
  test::TempDir dir("shard");
  std::string path = dir / "s.bin";
  {
    ShardWriter w(path, 4);
    w.add_document({70000, 5, 99999}, 1);
    w.add_document({}, 0);
    w.add_document({3}, 2);
    w.finish();
  }
  TokenShard s(path, 100000, 3);
  EXPECT_EQ(s.num_docs(), 3u);
  EXPECT_EQ(s.num_tokens(), 4u);
  EXPECT_EQ(doc_tokens(s, 0), (std::vector<int64_t>{70000, 5, 99999}));
  EXPECT_EQ(s.doc_length(1), 0u);
  EXPECT_EQ(s.doc_domain(2), 2u);
  // Tokens beyond the vocabulary, a truncated file, a bad magic: each a UserError naming the file.
  EXPECT_THROW(TokenShard(path, 80000, 3), UserError);
  std::string full = bytes_of(path);
  std::ofstream(dir / "trunc.bin", std::ios::binary) << full.substr(0, full.size() - 5);
  try {
    TokenShard t(dir / "trunc.bin", 100000, 3);
    FAIL();
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("trunc.bin"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("corrupt"), std::string::npos);
  }
  std::string bad = full;
  bad[0] = 'X';
  std::ofstream(dir / "magic.bin", std::ios::binary) << bad;
  EXPECT_THROW(TokenShard(dir / "magic.bin", 100000, 3), UserError);
  std::ofstream(dir / "tiny.bin", std::ios::binary) << "MFT";
  EXPECT_THROW(TokenShard(dir / "tiny.bin", 100000, 3), UserError);
}

TEST(Stream, DocumentsFramedWithBosEosAndWindowsCoverIt) {
  test::TempDir dir("stream");
  {
    ShardWriter w(dir / "train-00000.bin", 2);
    w.add_document({10, 11, 12}, 0);
    w.add_document({20}, 0);
    w.add_document({30, 31}, 0);
    w.finish();
    ShardWriter v(dir / "val-00000.bin", 2);
    v.finish();
    PreparedMeta m;
    m.vocab_size = 64;
    m.tokenizer = "tokenizer.model";
    m.domains = {""};
    m.train_shards = {"train-00000.bin"};
    m.val_shards = {"val-00000.bin"};
    write_prepared_meta(dir.path, m, 0, 0.0);
  }
  auto ds = std::make_shared<TokenDataset>(dir.path, "train");
  auto stream = std::make_shared<TokenStream>(ds);
  ASSERT_EQ(stream->size(), 12u);
  std::vector<int64_t> all(12);
  stream->read(0, 12, all.data());
  EXPECT_EQ(all, (std::vector<int64_t>{1, 10, 11, 12, 2, 1, 20, 2, 1, 30, 31, 2}));
  std::vector<int64_t> mid(5);
  stream->read(3, 5, mid.data());
  EXPECT_EQ(mid, (std::vector<int64_t>{12, 2, 1, 20, 2}));
  // seq_len 4: windows of 5 tokens at stride 4 -> (12 - 1) / 4 = 2 windows; targets are inputs shifted by one.
  LmSampler sampler(stream, 4, 0, false);
  EXPECT_EQ(sampler.num_windows(), 2);
  auto b = sampler.batch(0, 2);
  EXPECT_TRUE(torch::equal(b.inputs, torch::tensor({1, 10, 11, 12, 2, 1, 20, 2}, torch::kLong).view({2, 4})));
  EXPECT_TRUE(torch::equal(b.targets, torch::tensor({10, 11, 12, 2, 1, 20, 2, 1}, torch::kLong).view({2, 4})));
  // Shuffled order: a permutation per epoch, the same for the same seed.
  LmSampler s1(stream, 4, 9, true), s2(stream, 4, 9, true);
  for (int64_t g = 0; g < 6; ++g) EXPECT_TRUE(torch::equal(s1.batch(g, 1).inputs, s2.batch(g, 1).inputs));
}

TEST(TextSource, JsonlErrorsNameTheLine) {
  test::TempDir dir("jsonl");
  std::ofstream(dir / "a.jsonl") << "{\"text\": \"ok\"}\n{\"txt\": \"no\"}\n";
  try {
    for_each_document({dir / "a.jsonl"}, "", [](const Document&) {});
    FAIL();
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("a.jsonl:2"), std::string::npos) << e.what();
  }
  EXPECT_THROW(expand_inputs({dir / "*.none"}), UserError);
  std::ofstream(dir / "b.txt") << "one\ntwo\n\n\nthree\n";
  TextSourceOptions o;
  o.split_blank_lines = true;
  int n = 0;
  for_each_document({dir / "b.txt"}, o, [&](const Document&) { ++n; });
  EXPECT_EQ(n, 2);
}

TEST(Prepare, EmptyCorpusAndExistingOutput) {
  test::TempDir dir("empty");
  test::make_prepared(dir, 30);
  std::ofstream(dir / "empty.jsonl") << "\n\n";
  PrepareOptions p;
  p.tokenizer = dir / "tok/tokenizer.model";
  p.inputs = {dir / "empty.jsonl"};
  p.out_dir = dir / "out";
  p.progress = false;
  EXPECT_THROW(prepare_corpus(p), UserError);
  EXPECT_FALSE(fs::exists(dir / "out"));
  // An existing directory is not touched without --overwrite.
  p.inputs = {dir / "corpus.jsonl"};
  p.out_dir = dir / "data";
  auto before = bytes_of(dir / "data/train-00000.bin");
  EXPECT_THROW(prepare_corpus(p), UserError);
  EXPECT_EQ(bytes_of(dir / "data/train-00000.bin"), before);
  p.tokenizer = dir / "missing.model";
  p.out_dir = dir / "other";
  EXPECT_THROW(prepare_corpus(p), UserError);
}
