// moeforge export CHECKPOINT --format hf|gguf|peft --out PATH [--dtype D] [--max-shard-size S]
// A LoRA / QLoRA checkpoint exports its merged model (hf, gguf: base + scale * B A, a quantised base
// dequantised first) or its adapter alone (peft).
#include <torch/torch.h>

#include <cstdio>
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
#include "train/base_model.h"
#include "train/checkpoint.h"
#include "train/manifest.h"

namespace moeforge::cli {

namespace {

// --format peft: the adapters alone, for PEFT to load onto the base's --format hf export.
int export_adapter(const std::string& ckpt, const std::optional<train::BasePointer>& base, const std::string& out,
                   const std::string& dtype) {
  if (!base) throw UserError(ckpt + ": holds no adapters (no base.json); --format peft exports LoRA / QLoRA checkpoints");
  auto recipe = train::checkpoint_recipe(ckpt);
  if (!recipe) throw UserError(ckpt + ": an adapter checkpoint needs its recipe.yaml (the adapters' settings)");
  const LoraSpec& l = recipe->finetune.lora;
  MixtralForCausalLM model = train::load_checkpoint_model(ckpt);
  io::PeftAdapterConfig c;
  c.r = l.rank;
  c.lora_alpha = l.alpha;
  c.lora_dropout = l.dropout;
  c.target_modules = l.targets;
  c.use_rslora = l.rslora;
  for (const auto& t : l.targets)
    if (l.rank_of(t) != l.rank) c.rank_pattern[t] = l.rank_of(t);
  // PEFT loads the adapter onto a Hugging Face model: name the base only when it is one.
  const auto src = io::parse_init_source(base->init_from);
  if (src.hf) c.base_model_name_or_path = src.dir;
  else
    MF_INFO("the base is a moeforge checkpoint (" << src.dir << "): load the adapter onto its `moeforge export "
                                                 "--format hf` directory");
  io::export_peft(c, adapter_tensors(model), out, dtype);
  if (base->method == "qlora")
    MF_WARN("the adapters were trained on a " + quant_type_name(recipe->finetune.quant.type) +
            "-quantised base; applied to the float base they give the model up to its quantisation error");
  std::printf("exported %s -> %s (PEFT LoRA adapter, r %ld, alpha %g, %zu modules; base %s)\n", ckpt.c_str(),
              out.c_str(), (long)l.rank, l.alpha, l.targets.size(), base->init_from.c_str());
  return 0;
}

// --format hf of a full checkpoint (any layout): tensor by tensor from its memory-mapped files into the HF
// shards, one shard held at a time; the model is never built.
int export_streamed(const std::string& ckpt, const ModelConfig& cfg, const std::string& out, const std::string& dtype,
                    const std::string& shard) {
  train::require_intact_checkpoint(ckpt);
  std::vector<io::SafetensorsFile> files;
  std::map<std::string, size_t> file_of;
  for (const auto& path : train::checkpoint_weight_files(ckpt)) {
    files.push_back(io::SafetensorsFile::open(path));
    for (const auto& n : files.back().names()) file_of.emplace(n, files.size() - 1);
  }
  for (const auto& [n, i] : file_of) {
    if (n.find("expert_bias") == std::string::npos) continue;
    if (files[i].get(n).abs().max().item<double>() > 0) {
      MF_WARN("the aux-loss-free expert biases are not part of MixtralForCausalLM or llama.cpp's Mixtral; "
              "the exported model selects experts from the unbiased router logits");
      break;
    }
  }
  io::WeightStream ws;
  ws.shapes = parameter_shapes(cfg);
  for (const auto& [n, shape] : ws.shapes)
    if (!file_of.count(n)) throw UserError(ckpt + ": tensor '" + n + "' is missing from its weight files");
  ws.get = [&](const std::string& n) { return files[file_of.at(n)].get(n); };
  io::HfExportOptions o;
  o.out_dir = out;
  o.dtype = dtype.empty() ? "bf16" : dtype;
  o.max_shard_bytes = io::parse_size(shard, "--max-shard-size");
  o.tokenizer_path = train::checkpoint_tokenizer(ckpt);
  if (o.tokenizer_path.empty()) MF_WARN(ckpt << " has no tokenizer.model; the export has weights and config only");
  io::export_hf(cfg, ws, o);
  std::printf("exported %s -> %s (Hugging Face MixtralForCausalLM, %s)\n", ckpt.c_str(), out.c_str(), o.dtype.c_str());
  return 0;
}

}  // namespace

int cmd_export(const Args& in) {
  Args args = in;
  std::string format, out, dtype, shard = "5GB";
  if (!take_option(args, "--format", &format)) throw UserError("export: --format hf|gguf|peft is required");
  if (!take_option(args, "--out", &out)) throw UserError("export: --out PATH is required");
  take_option(args, "--dtype", &dtype);
  take_option(args, "--max-shard-size", &shard);
  reject_unknown_flags(args, "export", {"--format", "--out", "--dtype", "--max-shard-size"});
  if (args.size() != 1) throw UserError("export: expected one CHECKPOINT directory");
  if (format != "hf" && format != "gguf" && format != "peft")
    throw UserError("export: --format must be hf, gguf or peft, got '" + format + "'");
  const std::string ckpt = args[0];
  ModelConfig cfg = train::read_checkpoint_config(ckpt);
  const auto base = train::read_base_pointer(ckpt);
  if (format == "peft") return export_adapter(ckpt, base, out, dtype.empty() ? "fp32" : dtype);
  if (format == "hf" && !base) return export_streamed(ckpt, cfg, out, dtype, shard);
  MixtralForCausalLM model = train::load_checkpoint_model(ckpt);
  if (base) MF_INFO(ckpt << ": " << base->method << " adapters merged into their base (" << base->init_from << ")");
  for (auto& b : model->named_buffers()) {
    if (b.key().find("expert_bias") != std::string::npos && b.value().abs().max().item<double>() > 0) {
      MF_WARN("the aux-loss-free expert biases are not part of MixtralForCausalLM or llama.cpp's Mixtral; "
              "the exported model selects experts from the unbiased router logits");
      break;
    }
  }
  std::vector<std::pair<std::string, torch::Tensor>> weights = merged_weights(model);
  const std::string tok = train::checkpoint_tokenizer(ckpt);
  if (format == "hf") {
    io::HfExportOptions o;
    o.out_dir = out;
    o.dtype = dtype.empty() ? "bf16" : dtype;
    o.max_shard_bytes = io::parse_size(shard, "--max-shard-size");
    o.tokenizer_path = tok;
    if (tok.empty()) MF_WARN(ckpt << " has no tokenizer.model; the export has weights and config only");
    io::export_hf(cfg, weights, o);
    std::printf("exported %s -> %s (Hugging Face MixtralForCausalLM, %s)\n", ckpt.c_str(), out.c_str(), o.dtype.c_str());
    return 0;
  }
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
  if (cfg.sliding_window)
    MF_WARN("llama.cpp's llama architecture has no sliding window: the GGUF model attends to the whole context");
  std::string d = dtype.empty() ? "f16" : dtype == "fp16" ? "f16" : dtype == "fp32" ? "f32" : dtype;
  std::map<std::string, torch::Tensor> wm(weights.begin(), weights.end());
  io::export_gguf(cfg, wm, v, out, d);
  std::printf("exported %s -> %s (GGUF v3, llama architecture with %ld experts, %s)\n", ckpt.c_str(), out.c_str(),
              (long)cfg.moe.num_experts, d.c_str());
  return 0;
}

}  // namespace moeforge::cli
