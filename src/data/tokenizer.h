// SentencePiece tokenizer (BPE with byte fallback, Mistral's special ids: unk 0, <s> 1, </s> 2).
// Any SentencePiece .model file loads the same way (for example Mistral's tokenizer.model).
#pragma once
#include <string>
#include <vector>

namespace moeforge::data {

class Tokenizer {
 public:
  // Loads a .model file; a missing or invalid file is a UserError naming it.
  explicit Tokenizer(const std::string& model_path);
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  std::vector<int> encode(const std::string& text) const;
  std::string decode(const std::vector<int>& ids) const;
  int vocab_size() const;
  int bos_id() const;
  int eos_id() const;
  int unk_id() const;
  std::string piece(int id) const;
  float score(int id) const;
  bool is_control(int id) const;
  bool is_byte(int id) const;
  bool is_unknown(int id) const;
  const std::string& path() const { return path_; }

 private:
  void* handle_ = nullptr;  // a SentencePieceProcessor inside libmoeforge_spm.so (see spm_shim.h)
  std::string path_;
};

struct TokenizerTrainOptions {
  std::vector<std::string> inputs;  // plain text files (a line is a sentence) or .jsonl with "text"
  int vocab_size = 4096;
  std::string out_dir;              // writes out_dir/tokenizer.model and tokenizer.vocab
  int threads = 0;
  int64_t max_sentences = 2000000;
};

// Trains a BPE model with byte fallback through SentencePiece's C++ trainer; returns the model path.
std::string train_tokenizer(const TokenizerTrainOptions& opt);

}  // namespace moeforge::data
