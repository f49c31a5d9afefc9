// Small deterministic corpora, tokenizers and prepared directories for the data and training tests.
#pragma once
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "data/prepare.h"
#include "data/tokenizer.h"

namespace moeforge::test {

struct TempDir {
  std::string path;
  explicit TempDir(const std::string& tag) {
    path = (std::filesystem::temp_directory_path() /
            ("moeforge_" + tag + "_" + std::to_string(::getpid()) + "_" + std::to_string(std::random_device{}())))
               .string();
    std::filesystem::create_directories(path);
  }
  ~TempDir() {
    if (std::getenv("MOEFORGE_KEEP_TMP")) return;
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string operator/(const std::string& rel) const { return path + "/" + rel; }
};

// `n` documents of simple, repetitive English with a domain label ("alpha" / "beta" / "gamma").
inline std::vector<std::pair<std::string, std::string>> make_documents(int n, uint64_t seed = 7) {
  static const char* subjects[] = {"the cat", "a dog", "the old man", "my sister", "the river", "a small bird"};
  static const char* verbs[] = {"sees", "likes", "follows", "finds", "paints", "remembers"};
  static const char* objects[] = {"the moon", "a red apple", "the long road", "the quiet town", "a green boat",
                                  "the winter sky"};
  static const char* domains[] = {"alpha", "beta", "gamma"};
  std::mt19937_64 rng(seed);
  std::vector<std::pair<std::string, std::string>> docs;
  for (int d = 0; d < n; ++d) {
    std::string text;
    int sentences = 3 + static_cast<int>(rng() % 6);
    for (int s = 0; s < sentences; ++s) {
      std::string sent = std::string(subjects[rng() % 6]) + " " + verbs[rng() % 6] + " " + objects[rng() % 6] + ".";
      sent[0] = static_cast<char>(std::toupper(sent[0]));
      text += (s ? " " : "") + sent;
      if (s == 2) text += "\n";
    }
    docs.emplace_back(text, domains[d % 3]);
  }
  return docs;
}

inline std::string json_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '"') o += "\\\"";
    else if (c == '\\') o += "\\\\";
    else if (c == '\n') o += "\\n";
    else o += c;
  }
  return o;
}

inline std::string write_jsonl(const std::string& path, const std::vector<std::pair<std::string, std::string>>& docs) {
  std::ofstream out(path);
  for (auto& [text, domain] : docs) out << "{\"text\": \"" << json_escape(text) << "\", \"domain\": \"" << domain << "\"}\n";
  return path;
}

// Trains a 320-piece tokenizer on `docs` and prepares them into dir/data; returns the data dir.
inline std::string make_prepared(const TempDir& dir, int n_docs = 120, double val_fraction = 0.1, uint64_t seed = 1) {
  auto docs = make_documents(n_docs);
  std::string corpus = write_jsonl(dir / "corpus.jsonl", docs);
  data::TokenizerTrainOptions t;
  t.inputs = {corpus};
  t.vocab_size = 320;
  t.out_dir = dir / "tok";
  t.threads = 1;
  std::string model = data::train_tokenizer(t);
  data::PrepareOptions p;
  p.tokenizer = model;
  p.inputs = {corpus};
  p.out_dir = dir / "data";
  p.val_fraction = val_fraction;
  p.seed = seed;
  p.progress = false;
  data::prepare_corpus(p);
  return p.out_dir;
}

}  // namespace moeforge::test
