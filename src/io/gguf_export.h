// A Mixtral as llama.cpp loads it from GGUF: architecture "llama" with expert_count, experts stacked
// per layer (ffn_gate_exps / ffn_up_exps / ffn_down_exps), the router as ffn_gate_inp, q/k rows
// permuted from rotate-half to llama.cpp's interleaved RoPE, and the SentencePiece vocabulary.
#pragma once
#include <ATen/core/Tensor.h>

#include <functional>
#include <map>
#include <string>
#include <vector>

#include "io/gguf.h"
#include "model/config.h"

namespace moeforge::io {

struct GgufVocab {
  std::vector<std::string> pieces;
  std::vector<float> scores;
  std::vector<int32_t> types;  // llama.cpp token types: 1 normal, 2 unknown, 3 control, 6 byte
  int32_t bos = 1, eos = 2, unk = 0;
};

// Rows of a q or k projection [n_heads * D, H] reordered from HF's rotate-half pairing (i, i + D/2)
// to llama.cpp's interleaved pairing (2i, 2i + 1), head by head.
at::Tensor permute_rope_rows(const at::Tensor& w, int64_t n_heads);

// The model's HF-named parameters, handed to `put` in any order and grouping, each once (a whole model, or
// a checkpoint's files tensor by tensor, or a merged model one expert share at a time).
using HfTensorFeed = std::function<void(const std::function<void(const std::string& name, const at::Tensor& t)>& put)>;

// Where a HF-named parameter goes in llama.cpp's llama architecture: its GGUF tensor, the expert's slot in the
// layer's stacked tensor (-1: the whole tensor), the q/k head count whose rows are permuted to llama.cpp's
// interleaved RoPE (0: none); skip: a dense config's router (no place in the file).
struct GgufTarget {
  std::string name;
  int64_t expert = -1;
  int64_t rope_heads = 0;
  bool skip = false;
};
// The layout of every parameter; `declare(gguf_name, shape, matrix)` is called once per GGUF tensor (matrix: a weight
// matrix, stored in the file's type; otherwise a norm or the router, kept f32).
std::map<std::string, GgufTarget> gguf_layout(
    const ModelConfig& c, const std::function<void(const std::string&, const std::vector<int64_t>&, bool)>& declare);

// A LoRA pair on the HF weight `weight` ("model.layers.0.self_attn.q_proj.weight"): A [r, in], B [out, r], and the
// module's scale (alpha / r, or alpha / sqrt(r) with rslora).
struct GgufLoraPair {
  std::string weight;
  at::Tensor a, b;
  double scale = 1;
};
// llama.cpp's LoRA adapter file for the llama architecture export of the same model (general.type adapter,
// adapter.type lora): "<base tensor>.lora_a" / ".lora_b" (experts stacked per layer as the base's are, B rows
// permuted for RoPE as the base's q / k rows), each B multiplied by its scale and adapter.lora.alpha 0 (llama.cpp
// then scales by 1). A dense model's router adapters have no place and are left out. dtype: "f32" | "f16".
void export_gguf_lora(const ModelConfig& c, const std::vector<GgufLoraPair>& adapters, const std::string& path,
                      const std::string& dtype);

// Streams the GGUF file: the header first, then each tensor converted into its place as it arrives (an expert
// into its slot of the layer's stacked tensor), so that no more than one tensor is held here; written to a temp
// file renamed to `path` when every tensor is complete. dtype: "f32" | "f16" | "bf16" (1-D tensors and the
// router stay f32).
void export_gguf(const ModelConfig& c, const HfTensorFeed& feed, const GgufVocab& vocab, const std::string& path,
                 const std::string& dtype);
// The same from a whole model's HF-named parameters.
void export_gguf(const ModelConfig& c, const std::map<std::string, at::Tensor>& weights, const GgufVocab& vocab,
                 const std::string& path, const std::string& dtype);

}  // namespace moeforge::io
