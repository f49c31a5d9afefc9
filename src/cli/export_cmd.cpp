// moeforge export CHECKPOINT --format hf|gguf|peft --out PATH [--dtype D] [--max-shard-size S] [--expert-shares N]
//                [--drop-expert-bias]
// A LoRA / QLoRA checkpoint exports its merged model (hf, gguf: base + scale * B A, a quantised base
// dequantised first) or its adapter alone (peft, read from its files). hf and gguf stream: a full checkpoint
// tensor by tensor, an adapter checkpoint one expert share at a time (--expert-shares, default shares of ~1 GB
// of experts, so a model over ~1 GB of experts is never built whole).
#include <torch/torch.h>

#include <malloc.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <map>
#include <optional>

#include "cli/cli.h"
#include "core/error.h"
#include "core/log.h"
#include "data/tokenizer.h"
#include "io/gguf_export.h"
#include "io/hf_checkpoint.h"
#include "io/init_source.h"
#include "io/peft_export.h"
#include "io/safetensors.h"
#include "model/finetune.h"
#include "model/param_count.h"
#include "model/param_names.h"
#include "checkpoint/base_model.h"
#include "checkpoint/checkpoint.h"
#include "checkpoint/manifest.h"
#include "checkpoint/share_writer.h"

namespace moeforge::cli {

namespace {

// The adapters a complete checkpoint of `l` holds: one A/B pair per targeted module (per expert for w1/w2/w3).
int64_t expected_adapter_pairs(const ModelConfig& cfg, const LoraSpec& l) {
  int64_t per_layer = 0;
  for (const auto& t : l.targets)
    per_layer += (t == "w1" || t == "w2" || t == "w3") ? cfg.moe.num_experts : t == "lm_head" ? 0 : 1;
  return per_layer * cfg.num_layers + (l.targets_module("lm_head") ? 1 : 0);
}

// An adapter checkpoint's adapters, from its files (any layout; the base is never built): pairs of the right shapes
// for every targeted module, A [r, in] and B [out, r] for its weight [out, in] and the rank the recipe gives it.
// A file that lost or altered one is refused. Returns the recipe's adapter settings too.
std::vector<std::pair<std::string, at::Tensor>> read_adapters(const std::string& ckpt, const ModelConfig& cfg,
                                                              const std::optional<train::BasePointer>& base,
                                                              const std::string& format, LoraSpec* spec) {
  if (!base)
    throw UserError(ckpt + ": holds no adapters (no base.json); --format " + format + " exports LoRA / QLoRA checkpoints");
  auto recipe = train::checkpoint_recipe(ckpt);
  if (!recipe) throw UserError(ckpt + ": an adapter checkpoint needs its recipe.yaml (the adapters' settings)");
  const LoraSpec& l = recipe->finetune.lora;
  *spec = l;
  if (base->method == "qlora")
    MF_WARN("the adapters were trained on a " + quant_type_name(recipe->finetune.quant.type) +
            "-quantised base; applied to the float base they give the model up to its quantisation error");
  std::vector<io::SafetensorsFile> files;
  std::map<std::string, at::Tensor> found;
  for (const auto& path : train::checkpoint_weight_files(ckpt)) {  // verified against the manifest
    files.push_back(io::SafetensorsFile::open(path));
    for (const auto& n : files.back().names())
      if (n.find(".lora_A.") != std::string::npos || n.find(".lora_B.") != std::string::npos)
        found[n] = files.back().get(n);
  }
  std::map<std::string, std::vector<int64_t>> weight_shape;
  for (const auto& [n, shape] : parameter_shapes(cfg)) weight_shape[n] = shape;
  std::vector<std::pair<std::string, at::Tensor>> adapters;
  int64_t pairs = 0;
  for (const auto& [n, a] : found) {
    const auto p = n.find(".lora_A.weight");
    if (p == std::string::npos) continue;
    const std::string stem = n.substr(0, p), b_name = stem + ".lora_B.weight";
    const std::string target = stem.substr(stem.rfind('.') + 1);
    auto b = found.find(b_name);
    if (b == found.end()) throw UserError(ckpt + ": adapter '" + b_name + "' is missing");
    const int64_t r = l.targets_module(target) ? l.rank_of(target) : -1;
    auto w = weight_shape.find(stem + ".weight");
    if (w == weight_shape.end() || w->second.size() != 2)
      throw UserError(ckpt + ": adapter '" + stem + "' is for no linear layer of its model");
    const std::vector<int64_t> want_a{r, w->second[1]}, want_b{w->second[0], r};
    if (a.sizes().vec() != want_a || b->second.sizes().vec() != want_b)
      throw UserError(ckpt + ": adapter '" + stem + "' has A " + c10::str(a.sizes()) + " and B " +
                      c10::str(b->second.sizes()) + "; its recipe and config give A " +
                      c10::str(c10::IntArrayRef(want_a)) + " and B " + c10::str(c10::IntArrayRef(want_b)));
    adapters.emplace_back(n, a);
    adapters.emplace_back(b_name, b->second);
    ++pairs;
  }
  if (pairs != expected_adapter_pairs(cfg, l) || static_cast<int64_t>(found.size()) != 2 * pairs)
    throw UserError(ckpt + ": holds " + std::to_string(found.size()) + " adapter tensors; its recipe's targets make " +
                    std::to_string(2 * expected_adapter_pairs(cfg, l)));
  return adapters;
}

// --format gguf-lora: the adapters as llama.cpp's LoRA adapter for the base's --format gguf export.
int export_gguf_adapter(const std::string& ckpt, const ModelConfig& cfg, const std::optional<train::BasePointer>& base,
                        const std::string& out, const std::string& dtype) {
  LoraSpec l;
  const auto adapters = read_adapters(ckpt, cfg, base, "gguf-lora", &l);
  std::vector<io::GgufLoraPair> pairs;
  for (size_t i = 0; i < adapters.size(); i += 2) {  // A then B of each module (read_adapters' order)
    const std::string stem = adapters[i].first.substr(0, adapters[i].first.find(".lora_A.weight"));
    pairs.push_back({stem + ".weight", adapters[i].second, adapters[i + 1].second,
                     l.scale_of(stem.substr(stem.rfind('.') + 1))});
  }
  if (cfg.dense() && l.targets_module("gate"))
    MF_WARN("the router adapters of this dense model are left out: its GGUF has no router, and with one expert they "
            "changed nothing");
  io::export_gguf_lora(cfg, pairs, out, dtype.empty() ? "f32" : dtype == "fp32" ? "f32" : dtype == "fp16" ? "f16" : dtype);
  std::printf("exported the %zu adapter pairs of %s -> %s (llama.cpp LoRA adapter for the base's GGUF export, base %s)\n",
              pairs.size(), ckpt.c_str(), out.c_str(), base->init_from.c_str());
  return 0;
}

// --format peft: the adapters alone, for PEFT to load onto the base's --format hf export.
int export_adapter(const std::string& ckpt, const ModelConfig& cfg, const std::optional<train::BasePointer>& base,
                   const std::string& out, const std::string& dtype) {
  LoraSpec spec;
  std::vector<std::pair<std::string, at::Tensor>> adapters = read_adapters(ckpt, cfg, base, "peft", &spec);
  const LoraSpec& l = spec;
  io::PeftAdapterConfig c;
  c.r = l.rank;
  c.lora_alpha = l.alpha;
  c.lora_dropout = l.dropout;
  c.use_rslora = l.rslora;
  // A dense model is exported as MistralForCausalLM: its one expert's adapters sit on mlp.gate_proj / up_proj /
  // down_proj there.
  // down_proj there. Its router has no place there either, and an adapter on it changes nothing (one expert's weight
  // is 1 whatever its logit): dropped, with a warning.
  auto module = [&](const std::string& t) -> std::string {
    if (!cfg.dense()) return t;
    const std::string hf = io::dense_hf_name("model.layers.0.block_sparse_moe.experts.0." + t + ".weight");
    return hf.rfind("model.layers.0.mlp.", 0) == 0 ? hf.substr(19, hf.size() - 19 - 7) : t;
  };
  for (const auto& t : l.targets) {
    if (cfg.dense() && t == "gate") continue;
    c.target_modules.push_back(module(t));
    if (l.rank_of(t) != l.rank) c.rank_pattern[module(t)] = l.rank_of(t);
  }
  if (cfg.dense()) {
    const size_t before = adapters.size();
    adapters.erase(std::remove_if(adapters.begin(), adapters.end(),
                                  [](const auto& a) { return io::dense_hf_name(a.first).empty(); }),
                   adapters.end());
    if (adapters.size() != before)
      MF_WARN("the router adapters of this dense model are left out: a Mistral model has no router, and with one "
              "expert they changed nothing");
    for (auto& [n, a] : adapters) n = io::dense_hf_name(n);
  }
  // PEFT loads the adapter onto a Hugging Face model: name the base only when it is one.
  const auto src = io::parse_init_source(base->init_from);
  if (src.hf) c.base_model_name_or_path = src.dir;
  else
    MF_INFO("the base is a moeforge checkpoint (" << src.dir << "): load the adapter onto its `moeforge export "
                                                 "--format hf` directory");
  io::export_peft(c, adapters, out, dtype);
  std::printf("exported %s -> %s (PEFT LoRA adapter, r %ld, alpha %g, %zu modules; base %s)\n", ckpt.c_str(),
              out.c_str(), (long)l.rank, l.alpha, l.targets.size(), base->init_from.c_str());
  return 0;
}

// The largest |b| of the routers' aux-loss-free selection biases in the checkpoint's own files (an adapter
// checkpoint holds its fine-tune's), 0 when they are not in use, infinity for a NaN. The files are verified once
// per process.
double expert_bias_extent(const std::string& ckpt) {
  double m = 0;
  for (const auto& path : train::checkpoint_weight_files(ckpt)) {
    auto f = io::SafetensorsFile::open(path);
    for (const auto& n : f.names())
      if (n.find("expert_bias") != std::string::npos) {
        const double v = f.get(n).abs().max().item<double>();
        m = std::isnan(v) ? std::numeric_limits<double>::infinity() : std::max(m, v);
      }
  }
  return m;
}

// No exported format holds a bias that only selects experts (softmax weights from the unbiased logits): a
// checkpoint that routes with one exports only when --drop-expert-bias says to leave it out. Biases that its
// router does not read (a run continued with another balance keeps the buffers it started from) change nothing.
void check_expert_biases(const std::string& ckpt, const ModelConfig& cfg, const std::string& format, bool drop) {
  if (cfg.moe.balance != Balance::AuxFreeBias) return;
  const double b = expert_bias_extent(ckpt);
  if (b == 0) return;
  char extent[32];
  std::snprintf(extent, sizeof extent, "%.3g", b);
  const std::string holder = format == "hf"     ? "Hugging Face's Mixtral, Mistral and Qwen2-MoE"
                             : format == "gguf" || format == "gguf-lora" ? "llama.cpp's llama architecture"
                                                : "a PEFT adapter";
  const std::string what = "selects experts with aux-loss-free biases (model.moe.balance: aux_free_bias, |b| up to " +
                           std::string(extent) + "), which " + holder + " cannot hold";
  if (!drop)
    throw UserError("export: " + ckpt + " " + what +
                    ": the exported model would select by the router logits alone; pass --drop-expert-bias to "
                    "export it so");
  MF_WARN(ckpt << " " << what << "; left out (--drop-expert-bias): the exported model selects experts by the "
                                 "router logits alone");
}

// --format hf: the streamed HF export of `ws` with the checkpoint's tokenizer, and its one-line report.
void write_hf(const std::string& ckpt, const ModelConfig& cfg, const io::WeightStream& ws, const std::string& out,
              const std::string& dtype, const std::string& shard, const std::string& what) {
  io::HfExportOptions o;
  o.out_dir = out;
  o.dtype = dtype.empty() ? "bf16" : dtype;
  o.max_shard_bytes = io::parse_size(shard, "--max-shard-size");
  o.tokenizer_path = train::checkpoint_tokenizer(ckpt);
  if (o.tokenizer_path.empty()) MF_WARN(ckpt << " has no tokenizer.model; the export has weights and config only");
  io::export_hf(cfg, ws, o);
  std::printf("exported %s -> %s (Hugging Face %s, %s%s)\n", ckpt.c_str(), out.c_str(),
              io::hf_architecture(cfg).c_str(), o.dtype.c_str(), what.c_str());
}

// --format hf of a full checkpoint (any layout): tensor by tensor from its memory-mapped files into the HF
// shards, one shard held at a time; the model is never built.
int export_streamed(const std::string& ckpt, const ModelConfig& cfg, const std::string& out, const std::string& dtype,
                    const std::string& shard) {
  train::CheckpointTensors files(ckpt, cfg);
  io::WeightStream ws;
  ws.shapes = parameter_shapes(cfg);
  ws.get = [&](const std::string& n) { return files.get(n); };
  write_hf(ckpt, cfg, ws, out, dtype, shard, "");
  return 0;
}

// The expert id in a parameter name ("...block_sparse_moe.experts.5.w1.weight" -> 5), or -1 for a dense one.
int64_t expert_of(const std::string& name) {
  const auto p = parse_expert_param(name);
  return p ? p->expert : -1;
}

// A LoRA / QLoRA checkpoint's merged model, one expert share at a time: share k is the base's dense part (k = 0)
// and its k-th share of the experts, loaded from the base as in training, with that share's adapters from the
// checkpoint, merged. The base's fingerprint is checked over all shares when the last is loaded (before the
// caller renames its output into place).
class MergedShares {
 public:
  MergedShares(const std::string& ckpt, const ModelConfig& cfg, const train::BasePointer& base, int shares)
      : ckpt_(ckpt), cfg_(cfg), base_(base), shares_(shares) {
    train::require_intact_checkpoint(ckpt);
    auto recipe = train::checkpoint_recipe(ckpt);
    if (!recipe) throw UserError(ckpt + ": an adapter checkpoint needs its recipe.yaml (the adapters' settings)");
    if (recipe->finetune.method != base.method)
      throw UserError(ckpt + "/base.json: method " + base.method + " but recipe.yaml says " + recipe->finetune.method);
    recipe_ = *recipe;
    const int64_t E = cfg.moe.num_experts;
    if (shares < 1 || E % shares != 0)
      throw UserError("export: --expert-shares must divide model.moe.num_experts (" + std::to_string(E) + "), got " +
                      std::to_string(shares));
    per_ = E / shares;
  }
  int shares() const { return shares_; }
  // The share a parameter belongs to (dense ones: share 0).
  int share_of(const std::string& name) const {
    const int64_t e = expert_of(name);
    return e < 0 ? 0 : static_cast<int>(e / per_);
  }
  // Share k's merged tensors (the previous share's are released first).
  const std::map<std::string, torch::Tensor>& load(int k) {
    if (k == current_) return merged_;
    merged_.clear();
    ::malloc_trim(0);
    const ExpertRange held = shares_ > 1 ? ExpertRange{k * per_, per_} : ExpertRange{};
    train::BaseModel b = train::load_base_model(base_.init_from, cfg_, recipe_.finetune, "fp32", held);
    if (k == 0) dense_fp_ = b.fingerprint ^ b.experts_fingerprint;
    experts_fp_ ^= b.experts_fingerprint;
    if (k == shares_ - 1 && (dense_fp_ ^ experts_fp_) != base_.fingerprint)
      throw UserError(ckpt_ + "/base.json: the base at " + base_.init_from +
                      " is not the one these adapters were trained on (its fingerprint differs)");
    attach_lora(b.model, recipe_.finetune.lora, recipe_.train.seed);
    train::load_model_weights(ckpt_, b.model);
    for (auto& [name, t] : merged_weights(b.model)) merged_[name] = t;
    current_ = k;
    return merged_;
  }

 private:
  std::string ckpt_;
  ModelConfig cfg_;
  train::BasePointer base_;
  train::Recipe recipe_;
  int shares_ = 1, current_ = -1;
  int64_t per_ = 1;
  uint64_t dense_fp_ = 0, experts_fp_ = 0;
  std::map<std::string, torch::Tensor> merged_;
};

// --format hf of a LoRA / QLoRA checkpoint: the merged model share by share (dense first), written in that
// order, one shard held at a time.
int export_merged_streamed(const std::string& ckpt, const ModelConfig& cfg, const train::BasePointer& base,
                           const std::string& out, const std::string& dtype, const std::string& shard, int shares) {
  MergedShares merged(ckpt, cfg, base, shares);
  io::WeightStream ws;
  for (int k = 0; k < shares; ++k)
    for (const auto& [n, shape] : parameter_shapes(cfg))
      if (merged.share_of(n) == k) ws.shapes.push_back({n, shape});
  ws.get = [&](const std::string& n) { return merged.load(merged.share_of(n)).at(n); };
  write_hf(ckpt, cfg, ws, out, dtype, shard, "; " + base.method + " adapters merged into their base " + base.init_from);
  return 0;
}

// GGUF's vocabulary from the checkpoint's tokenizer (rows past it: unused pieces).
io::GgufVocab gguf_vocab(const std::string& ckpt, const ModelConfig& cfg) {
  const std::string tok = train::checkpoint_tokenizer(ckpt);
  if (tok.empty()) throw UserError(ckpt + ": has no tokenizer.model, which GGUF needs for its vocabulary");
  data::Tokenizer t(tok);
  if (t.vocab_size() > cfg.vocab_size)
    throw UserError(tok + ": has " + std::to_string(t.vocab_size()) + " pieces, more than the model's vocab_size");
  io::GgufVocab v;
  for (int i = 0; i < cfg.vocab_size; ++i) {
    if (i < t.vocab_size()) {
      v.pieces.push_back(t.piece(i));
      v.scores.push_back(t.score(i));
      v.types.push_back(t.is_unknown(i) ? 2 : t.is_control(i) ? 3 : t.is_byte(i) ? 6 : 1);
    } else {  // the embedding is larger than the tokenizer: unused rows
      v.pieces.push_back("<unused" + std::to_string(i) + ">");
      v.scores.push_back(0.0f);
      v.types.push_back(5);
    }
  }
  v.bos = t.bos_id();
  v.eos = t.eos_id();
  v.unk = t.unk_id();
  return v;
}

// --format gguf, streamed like hf: a full checkpoint tensor by tensor from its files, an adapter checkpoint's
// merged model one expert share at a time (each expert written into its slot of its layer's stacked tensor).
int export_gguf_streamed(const std::string& ckpt, const ModelConfig& cfg, const std::optional<train::BasePointer>& base,
                         const std::string& out, const std::string& dtype, int shares) {
  const io::GgufVocab v = gguf_vocab(ckpt, cfg);
  if (cfg.sliding_window)
    MF_WARN("llama.cpp's llama architecture has no sliding window: the GGUF model attends to the whole context");
  const std::string d = dtype.empty() ? "f16" : dtype == "fp16" ? "f16" : dtype == "fp32" ? "f32" : dtype;
  using Put = std::function<void(const std::string&, const at::Tensor&)>;
  if (!base) {
    train::CheckpointTensors files(ckpt, cfg);
    io::export_gguf(
        cfg, [&](const Put& put) {
          for (const auto& [n, shape] : parameter_shapes(cfg)) put(n, files.get(n));
        },
        v, out, d);
  } else {
    MF_INFO(ckpt << ": " << base->method << " adapters merged into their base (" << base->init_from << ")");
    MergedShares merged(ckpt, cfg, *base, shares);
    io::export_gguf(
        cfg, [&](const Put& put) {
          for (int k = 0; k < merged.shares(); ++k)
            for (const auto& [n, shape] : parameter_shapes(cfg))
              if (merged.share_of(n) == k) put(n, merged.load(k).at(n));
        },
        v, out, d);
  }
  const std::string arch = cfg.dense() ? "dense" : "with " + std::to_string(cfg.moe.num_experts) + " experts";
  std::printf("exported %s -> %s (GGUF v3, llama architecture %s, %s)\n", ckpt.c_str(), out.c_str(), arch.c_str(),
              d.c_str());
  return 0;
}

}  // namespace

int cmd_export(const Args& in) {
  Args args = in;
  std::string format, out, dtype, shard = "5GB", shares_s;
  if (!take_option(args, "--format", &format)) throw UserError("export: --format hf|gguf|peft|gguf-lora is required");
  if (!take_option(args, "--out", &out)) throw UserError("export: --out PATH is required");
  take_option(args, "--dtype", &dtype);
  take_option(args, "--max-shard-size", &shard);
  take_option(args, "--expert-shares", &shares_s);
  const bool drop_bias = take_flag(args, "--drop-expert-bias");
  reject_unknown_flags(args, "export",
                       {"--format", "--out", "--dtype", "--max-shard-size", "--expert-shares", "--drop-expert-bias"});
  if (args.size() != 1) throw UserError("export: expected one CHECKPOINT directory");
  if (format != "hf" && format != "gguf" && format != "peft" && format != "gguf-lora")
    throw UserError("export: --format must be hf, gguf, peft or gguf-lora, got '" + format + "'");
  const std::string ckpt = args[0];
  ModelConfig cfg = train::read_checkpoint_config(ckpt);
  const auto base = train::read_base_pointer(ckpt);
  // What the format cannot hold is refused before anything is read or written.
  if (format == "hf") (void)io::hf_architecture(cfg);
  if (cfg.moe.num_shared_experts > 0 && format != "hf")
    throw UserError("export: " + ckpt + " has shared experts (moe.num_shared_experts " +
                    std::to_string(cfg.moe.num_shared_experts) + "); --format " + format +
                    (format == "gguf" || format == "gguf-lora" ? " writes llama.cpp's llama architecture, which has none"
                                      : " writes adapters for a Mixtral or Mistral base") +
                    " (--format hf writes Qwen2MoeForCausalLM)");
  if ((format != "peft" && format != "gguf-lora") || base) check_expert_biases(ckpt, cfg, format, drop_bias);
  if (format == "peft") return export_adapter(ckpt, cfg, base, out, dtype.empty() ? "fp32" : dtype);
  if (format == "gguf-lora") return export_gguf_adapter(ckpt, cfg, base, out, dtype);
  if (format == "hf" && !base) return export_streamed(ckpt, cfg, out, dtype, shard);
  int shares = train::default_expert_shares(cfg);
  if (!shares_s.empty()) {
    shares = std::atoi(shares_s.c_str());
    if (std::to_string(shares) != shares_s)
      throw UserError("export: --expert-shares must be a positive integer, got '" + shares_s + "'");
  }
  if (format == "hf") return export_merged_streamed(ckpt, cfg, *base, out, dtype, shard, shares);
  return export_gguf_streamed(ckpt, cfg, base, out, dtype, shares);
}

}  // namespace moeforge::cli
