#include "data/tokenizer.h"

#include <dlfcn.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <mutex>
#include <thread>

#include "core/error.h"
#include "core/log.h"
#include "data/spm_shim.h"
#include "data/text_source.h"

namespace moeforge::data {

namespace fs = std::filesystem;

namespace {

// SentencePiece lives in libmoeforge_spm.so, loaded privately (spm_shim.h says why).
struct Spm {
  decltype(&mf_spm_load) load;
  decltype(&mf_spm_free) free_;
  decltype(&mf_spm_encode) encode;
  decltype(&mf_spm_decode) decode;
  decltype(&mf_spm_piece) piece;
  decltype(&mf_spm_info) info;
  decltype(&mf_spm_score) score;
  decltype(&mf_spm_train) train;
  decltype(&mf_spm_release) release;
};

const Spm& spm() {
  static Spm api;
  static std::once_flag once;
  std::call_once(once, [] {
    std::vector<std::string> candidates;
    if (const char* env = std::getenv("MOEFORGE_SPM_LIB")) candidates.push_back(env);
    std::error_code ec;
    fs::path exe = fs::read_symlink("/proc/self/exe", ec);
    if (!ec) {
      candidates.push_back((exe.parent_path() / "libmoeforge_spm.so").string());
      candidates.push_back((exe.parent_path().parent_path() / "libmoeforge_spm.so").string());
      candidates.push_back((exe.parent_path().parent_path() / "lib" / "libmoeforge_spm.so").string());
    }
#ifdef MOEFORGE_SPM_LIB_DEFAULT
    candidates.push_back(MOEFORGE_SPM_LIB_DEFAULT);
#endif
    void* h = nullptr;
    std::string tried, last_error;
    for (const auto& c : candidates) {
      if (!fs::exists(c)) {
        tried += (tried.empty() ? "" : ", ") + c;
        continue;
      }
      // A new link-map namespace: SentencePiece gets its own protobuf and C++ runtime copies.
      // (RTLD_DEEPBIND is not enough: it binds the library to an uninitialised std::cerr.)
      h = ::dlmopen(LM_ID_NEWLM, c.c_str(), RTLD_NOW | RTLD_LOCAL);
      if (h) break;
      const char* e = ::dlerror();
      last_error = e ? e : "unknown dlopen error";
    }
    if (!h)
      throw UserError("cannot load libmoeforge_spm.so (the SentencePiece wrapper); looked at: " + tried +
                      (last_error.empty() ? "" : "; " + last_error) + ". Set MOEFORGE_SPM_LIB to its path");
    auto sym = [&](const char* name) {
      void* s = ::dlsym(h, name);
      if (!s) throw UserError(std::string("libmoeforge_spm.so lacks ") + name + "; rebuild moeforge");
      return s;
    };
    api.load = reinterpret_cast<decltype(api.load)>(sym("mf_spm_load"));
    api.free_ = reinterpret_cast<decltype(api.free_)>(sym("mf_spm_free"));
    api.encode = reinterpret_cast<decltype(api.encode)>(sym("mf_spm_encode"));
    api.decode = reinterpret_cast<decltype(api.decode)>(sym("mf_spm_decode"));
    api.piece = reinterpret_cast<decltype(api.piece)>(sym("mf_spm_piece"));
    api.info = reinterpret_cast<decltype(api.info)>(sym("mf_spm_info"));
    api.score = reinterpret_cast<decltype(api.score)>(sym("mf_spm_score"));
    api.train = reinterpret_cast<decltype(api.train)>(sym("mf_spm_train"));
    api.release = reinterpret_cast<decltype(api.release)>(sym("mf_spm_release"));
  });
  return api;
}

}  // namespace

Tokenizer::Tokenizer(const std::string& model_path) : path_(model_path) {
  if (!fs::exists(model_path)) throw UserError(model_path + ": tokenizer model not found");
  if (fs::is_directory(model_path)) throw UserError(model_path + ": is a directory, not a SentencePiece .model file");
  char err[512] = {};
  if (spm().load(model_path.c_str(), &handle_, err, sizeof err) != 0)
    throw UserError(model_path + ": not a SentencePiece model: " + err);
}

Tokenizer::~Tokenizer() {
  if (handle_) spm().free_(handle_);
}

Tokenizer::Tokenizer(Tokenizer&& o) noexcept : handle_(o.handle_), path_(std::move(o.path_)) { o.handle_ = nullptr; }

std::vector<int> Tokenizer::encode(const std::string& text) const {
  int* ids = nullptr;
  size_t n = 0;
  char err[512] = {};
  if (spm().encode(handle_, text.data(), text.size(), &ids, &n, err, sizeof err) != 0)
    throw UserError(path_ + ": encoding failed: " + err);
  std::vector<int> out(ids, ids + n);
  spm().release(ids);
  return out;
}

std::string Tokenizer::decode(const std::vector<int>& ids) const {
  char* text = nullptr;
  size_t n = 0;
  char err[512] = {};
  if (spm().decode(handle_, ids.data(), ids.size(), &text, &n, err, sizeof err) != 0)
    throw UserError(path_ + ": decoding failed: " + err);
  std::string out(text, n);
  spm().release(text);
  return out;
}

int Tokenizer::vocab_size() const { return spm().info(handle_, 0, 0); }
int Tokenizer::bos_id() const { return spm().info(handle_, 1, 0); }
int Tokenizer::eos_id() const { return spm().info(handle_, 2, 0); }
int Tokenizer::unk_id() const { return spm().info(handle_, 3, 0); }
bool Tokenizer::is_control(int id) const { return spm().info(handle_, 4, id) == 1; }
bool Tokenizer::is_byte(int id) const { return spm().info(handle_, 5, id) == 1; }
bool Tokenizer::is_unknown(int id) const { return spm().info(handle_, 6, id) == 1; }
float Tokenizer::score(int id) const { return spm().score(handle_, id); }
std::string Tokenizer::piece(int id) const {
  std::string buf(256, '\0');
  size_t n = spm().piece(handle_, id, buf.data(), buf.size());
  if (n >= buf.size()) {
    buf.assign(n + 1, '\0');
    spm().piece(handle_, id, buf.data(), buf.size());
  }
  buf.resize(n);
  return buf;
}

std::string train_tokenizer(const TokenizerTrainOptions& opt) {
  if (opt.inputs.empty()) throw UserError("tokenizer train: no --input files");
  if (opt.vocab_size < 300)
    throw UserError("tokenizer train: --vocab-size must be at least 300 (256 byte pieces + specials)");
  fs::create_directories(opt.out_dir);
  // SentencePiece reads sentences line by line: write every document's lines to one temp file.
  const std::string tmp = opt.out_dir + "/.tokenizer-input-" + std::to_string(::getpid()) + ".txt";
  int64_t lines = 0;
  {
    std::ofstream out(tmp);
    if (!out) throw UserError(opt.out_dir + ": cannot write");
    for_each_document(expand_inputs(opt.inputs), "", [&](const Document& d) {
      size_t start = 0;
      while (start <= d.text.size()) {
        size_t nl = d.text.find('\n', start);
        if (nl == std::string::npos) nl = d.text.size();
        if (nl > start && d.text.find_first_not_of(" \t\r", start) < nl) {
          out.write(d.text.data() + start, static_cast<std::streamsize>(nl - start));
          out << '\n';
          ++lines;
        }
        start = nl + 1;
      }
    });
  }
  if (lines == 0) {
    fs::remove(tmp);
    throw UserError("tokenizer train: the inputs contain no text");
  }
  int threads = opt.threads > 0 ? opt.threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const std::string prefix = opt.out_dir + "/tokenizer";
  std::string args = "--input=" + tmp + " --model_prefix=" + prefix + " --vocab_size=" + std::to_string(opt.vocab_size) +
                     " --model_type=bpe --byte_fallback=true --character_coverage=0.9999"
                     " --unk_id=0 --bos_id=1 --eos_id=2 --pad_id=-1"
                     " --split_digits=true --normalization_rule_name=identity --remove_extra_whitespaces=false"
                     " --allow_whitespace_only_pieces=true --max_sentence_length=16384 --minloglevel=1"
                     " --input_sentence_size=" + std::to_string(opt.max_sentences) +
                     " --shuffle_input_sentence=true --num_threads=" + std::to_string(threads);
  MF_INFO("tokenizer: training BPE, vocab " << opt.vocab_size << ", " << lines << " lines");
  char err[1024] = {};
  int rc = spm().train(args.c_str(), err, sizeof err);
  fs::remove(tmp);
  if (rc != 0) throw UserError(std::string("tokenizer train: SentencePiece failed: ") + err);
  return prefix + ".model";
}

}  // namespace moeforge::data
