// Built into libmoeforge_spm.so (not into moeforge_lib): see spm_shim.h for why.
#include "data/spm_shim.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {
int fail(const std::string& msg, char* err, size_t errlen) {
  if (err && errlen) {
    std::strncpy(err, msg.c_str(), errlen - 1);
    err[errlen - 1] = '\0';
  }
  return 1;
}
sentencepiece::SentencePieceProcessor* sp(void* h) { return static_cast<sentencepiece::SentencePieceProcessor*>(h); }
}  // namespace

extern "C" {

int mf_spm_load(const char* model_path, void** handle, char* err, size_t errlen) {
  auto* p = new sentencepiece::SentencePieceProcessor();
  auto st = p->Load(model_path);
  if (!st.ok()) {
    delete p;
    return fail(st.ToString(), err, errlen);
  }
  *handle = p;
  return 0;
}

void mf_spm_free(void* handle) { delete sp(handle); }

int mf_spm_encode(void* handle, const char* text, size_t len, int** ids, size_t* n, char* err, size_t errlen) {
  std::vector<int> out;
  auto st = sp(handle)->Encode(std::string(text, len), &out);
  if (!st.ok()) return fail(st.ToString(), err, errlen);
  *n = out.size();
  *ids = static_cast<int*>(std::malloc(std::max<size_t>(1, out.size()) * sizeof(int)));
  std::memcpy(*ids, out.data(), out.size() * sizeof(int));
  return 0;
}

int mf_spm_decode(void* handle, const int* ids, size_t n, char** text, size_t* len, char* err, size_t errlen) {
  std::string out;
  auto st = sp(handle)->Decode(std::vector<int>(ids, ids + n), &out);
  if (!st.ok()) return fail(st.ToString(), err, errlen);
  *len = out.size();
  *text = static_cast<char*>(std::malloc(out.size() + 1));
  std::memcpy(*text, out.data(), out.size());
  (*text)[out.size()] = '\0';
  return 0;
}

size_t mf_spm_piece(void* handle, int id, char* buf, size_t buflen) {
  const std::string& p = sp(handle)->IdToPiece(id);
  if (buf && buflen) {
    size_t k = std::min(p.size(), buflen - 1);
    std::memcpy(buf, p.data(), k);
    buf[k] = '\0';
  }
  return p.size();
}

int mf_spm_info(void* handle, int what, int id) {
  auto* p = sp(handle);
  switch (what) {
    case 0: return p->GetPieceSize();
    case 1: return p->bos_id();
    case 2: return p->eos_id();
    case 3: return p->unk_id();
    case 4: return p->IsControl(id) ? 1 : 0;
    case 5: return p->IsByte(id) ? 1 : 0;
    case 6: return p->IsUnknown(id) ? 1 : 0;
  }
  return -1;
}

float mf_spm_score(void* handle, int id) { return sp(handle)->GetScore(id); }

int mf_spm_train(const char* args, char* err, size_t errlen) {
  auto st = sentencepiece::SentencePieceTrainer::Train(args);
  if (!st.ok()) return fail(st.ToString(), err, errlen);
  return 0;
}

void mf_spm_release(void* p) { std::free(p); }
}
