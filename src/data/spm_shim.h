// C interface of libmoeforge_spm.so, the one place that links SentencePiece.
//
// Why a separate library: Debian's libsentencepiece embeds its own copy of protobuf-lite and
// exports those symbols, while LibTorch links the system libprotobuf. Linked into one process
// the two copies interpose each other and the process crashes at start-up. The shim is loaded
// with dlopen(RTLD_LOCAL | RTLD_DEEPBIND), so SentencePiece and its protobuf stay private.
#pragma once
#include <stddef.h>

extern "C" {
// Every call returns 0 on success; on failure a message is written to err (errlen bytes).
int mf_spm_load(const char* model_path, void** handle, char* err, size_t errlen);
void mf_spm_free(void* handle);
int mf_spm_encode(void* handle, const char* text, size_t len, int** ids, size_t* n, char* err, size_t errlen);
int mf_spm_decode(void* handle, const int* ids, size_t n, char** text, size_t* len, char* err, size_t errlen);
// Writes the piece of `id` into buf (NUL-terminated, truncated to buflen); returns its full length.
size_t mf_spm_piece(void* handle, int id, char* buf, size_t buflen);
int mf_spm_info(void* handle, int what, int id);  // what: 0 size, 1 bos, 2 eos, 3 unk, 4 is_control, 5 is_byte, 6 is_unknown
float mf_spm_score(void* handle, int id);
int mf_spm_train(const char* args, char* err, size_t errlen);
void mf_spm_release(void* p);  // frees what encode/decode returned
}
