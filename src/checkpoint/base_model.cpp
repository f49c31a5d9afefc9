#include "checkpoint/base_model.h"

#include <torch/torch.h>

#include <malloc.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <yaml-cpp/yaml.h>

#include "core/error.h"
#include "core/log.h"
#include "io/hf_checkpoint.h"
#include "io/init_source.h"
#include "io/safetensors.h"
#include "model/finetune.h"
#include "model/param_names.h"
#include "checkpoint/checkpoint.h"

namespace moeforge::train {

namespace fs = std::filesystem;

namespace {

// Where a base's tensors come from: a Hugging Face directory, a moeforge checkpoint's files (any layout),
// or, for a base that is itself an adapter checkpoint, its merged weights.
class WeightSource {
 public:
  WeightSource(const std::string& init_from, ExpertRange held, const GroupXor& over_group) {
    const auto src = io::parse_init_source(init_from);
    where_ = src.dir;
    if (src.hf) {
      hf_ = std::make_unique<io::HfCheckpoint>(src.dir);
      return;
    }
    if (auto base = read_base_pointer(src.dir)) {  // adapters on adapters: this base is a merged model
      MF_INFO(src.dir << " is an adapter checkpoint: its adapters are merged into its base to form this base");
      // A share without a group is an export going share by share in one process: its caller checks the base it
      // loads here (whose fingerprint covers these merged values) over all shares, so this one is not checked.
      auto m = load_adapter_checkpoint_model(src.dir, *base, held, over_group, held.all() || over_group);
      for (auto& [n, t] : merged_weights(m)) merged_[n] = t;
      for (auto& b : m->named_buffers()) merged_[b.key()] = b.value().detach();
      return;
    }
    for (const auto& path : checkpoint_weight_files(src.dir)) {
      files_.push_back(io::SafetensorsFile::open(path));
      for (const auto& n : files_.back().names())
        if (!file_of_.emplace(n, files_.size() - 1).second)
          throw UserError(path + ": tensor '" + n + "' is in two files of the checkpoint's layout");
    }
  }

  bool has(const std::string& name) const {
    if (hf_) return hf_->has(name);
    if (!merged_.empty()) return merged_.count(name) > 0;
    return file_of_.count(name) > 0;
  }

  at::Tensor get(const std::string& name) const {
    if (hf_) return hf_->get(name);
    if (!merged_.empty()) {
      auto it = merged_.find(name);
      if (it == merged_.end()) throw UserError(where_ + ": tensor '" + name + "' is missing");
      return it->second;
    }
    auto it = file_of_.find(name);
    if (it == file_of_.end()) throw UserError(where_ + ": tensor '" + name + "' is missing");
    return files_[it->second].get(name);
  }

  // Tensors of a Hugging Face directory that no parameter explains (another architecture).
  void check_explained(const std::vector<std::string>& names) const {
    if (!hf_) return;
    auto extra = hf_->unexplained(names);
    if (!extra.empty())
      throw UserError(where_ + ": " + std::to_string(extra.size()) +
                      " tensors do not belong to a Mixtral of this config, e.g. '" + extra.front() + "'");
  }

  const std::string& where() const { return where_; }

 private:
  std::string where_;
  std::unique_ptr<io::HfCheckpoint> hf_;
  std::vector<io::SafetensorsFile> files_;
  std::map<std::string, size_t> file_of_;
  std::map<std::string, at::Tensor> merged_;
};

std::string hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

}  // namespace

BaseModel load_base_model(const std::string& init_from, const ModelConfig& cfg, const FinetuneSpec& ft,
                          const std::string& precision, ExpertRange held, const GroupXor& over_group) {
  WeightSource src(init_from, held, over_group);
  BaseModel out;
  std::vector<std::string> names;
  torch::NoGradGuard ng;
  auto load = [&](const std::string& name, torch::Tensor& dst) {
    if (name == "lm_head.weight" && !src.has(name))
      throw UserError(src.where() + ": 'lm_head.weight' is missing and tie_word_embeddings is false");
    auto t = src.get(name);
    if (t.sizes() != dst.sizes())
      throw UserError(src.where() + ": tensor '" + name + "' has shape " + c10::str(t.sizes()) +
                      ", the model expects " + c10::str(dst.sizes()));
    dst.copy_(t.to(dst.scalar_type()));
    const uint64_t fp = tensor_fingerprint(name, dst);
    out.fingerprint ^= fp;
    if (is_expert_param(name)) out.experts_fingerprint ^= fp;
    names.push_back(name);
  };
  // Each layer is loaded (and quantised) as soon as it is built.
  OnLayerBuilt on_layer = [&](int64_t i, DecoderLayerImpl& layer) {
    const std::string pre = "model.layers." + std::to_string(i) + ".";
    for (auto& p : layer.named_parameters()) load(pre + p.key(), p.value());
    for (auto& p : layer.parameters()) p.requires_grad_(false);
    if (ft.quantized()) quantize_layer(layer, ft.quant);
    else if (precision == "bf16") store_linear_weights(layer, torch::kBFloat16);
    // The layer's float copies were freed, but glibc keeps freed heap pages resident (and, having seen large
    // blocks freed, serves the next layer's from the heap too): hand them back now, or the resident set grows
    // by a layer per layer as if nothing had been freed.
    ::malloc_trim(0);
  };
  out.model = MixtralForCausalLM(cfg, on_layer, held);
  for (auto& p : out.model->named_parameters())
    if (p.key().rfind("model.layers.", 0) != 0) load(p.key(), p.value());
  for (auto& b : out.model->named_buffers()) {
    if (src.has(b.key())) b.value().copy_(src.get(b.key()).to(b.value().scalar_type()));
    else b.value().zero_();  // expert biases start at zero where the source has none (an HF model)
  }
  // The experts of other ranks belong to the model too (not read here).
  if (!held.all())
    for (auto& n : expert_names_outside(cfg.num_layers, cfg.moe.num_experts, held.first, held.count)) names.push_back(n);
  src.check_explained(names);
  freeze_base(out.model);
  return out;
}

std::string base_pointer_json(const BasePointer& b) {
  nlohmann::json j = {{"init_from", b.init_from}, {"fingerprint", hex(b.fingerprint)}, {"method", b.method}};
  return j.dump(2) + "\n";
}

std::optional<BasePointer> read_base_pointer(const std::string& ckpt_dir) {
  const std::string p = ckpt_dir + "/base.json";
  if (!fs::exists(p)) return std::nullopt;
  std::ifstream in(p);
  BasePointer b;
  try {
    auto j = nlohmann::json::parse(in);
    b.init_from = j.at("init_from").get<std::string>();
    b.method = j.at("method").get<std::string>();
    const std::string fp = j.at("fingerprint").get<std::string>();
    size_t used = 0;
    b.fingerprint = std::stoull(fp, &used, 16);
    if (used != fp.size() || fp.size() != 16) throw std::invalid_argument("fingerprint");
  } catch (const std::exception&) {
    throw UserError(p + ": invalid base pointer (expected init_from, fingerprint: 16 hex digits, method)");
  }
  if (b.method != "lora" && b.method != "qlora") throw UserError(p + ": method must be lora or qlora, got '" + b.method + "'");
  if (b.init_from.empty()) throw UserError(p + ": init_from is empty");
  return b;
}

bool checkpoint_updates_expert_bias(const std::string& ckpt_dir) {
  const std::string p = ckpt_dir + "/recipe.yaml";
  if (!fs::exists(p)) throw UserError(p + ": missing; an adapter checkpoint keeps the recipe it was trained with");
  try {
    const YAML::Node root = YAML::LoadFile(p);  // const: looking adds no keys
    // Any level missing: written before the key, when the biases stayed frozen.
    if (root.IsNull()) throw UserError(p + ": empty; an adapter checkpoint keeps the recipe it was trained with");
    if (!root.IsMap()) return false;
    const YAML::Node ft = root["finetune"];
    if (!ft || !ft.IsMap()) return false;
    const YAML::Node lora = ft["lora"];
    if (!lora || !lora.IsMap()) return false;
    const YAML::Node key = lora["update_expert_bias"];
    if (!key) return false;
    return key.as<bool>();
  } catch (const YAML::Exception& e) {
    throw UserError(p + ": finetune.lora.update_expert_bias: not readable (" + std::string(e.what()) + ")");
  }
}

MixtralForCausalLM load_adapter_checkpoint_model(const std::string& ckpt_dir, const BasePointer& base, ExpertRange held,
                                                 const GroupXor& over_group, bool check_base) {
  auto recipe = checkpoint_recipe(ckpt_dir);
  if (!recipe) throw UserError(ckpt_dir + ": an adapter checkpoint needs its recipe.yaml (the adapters' settings)");
  if (recipe->finetune.method != base.method)
    throw UserError(ckpt_dir + "/base.json: method " + base.method + " but recipe.yaml says " + recipe->finetune.method);
  const ModelConfig cfg = read_checkpoint_config(ckpt_dir);
  MF_CHECK(!check_base || held.all() || over_group, "a share of an adapter checkpoint's experts needs the group to check its base");
  // The base in fp32 storage (a QLoRA base quantised, as trained): bf16 storage is a training-time saving,
  // and eval --precision fp32, export and a chained base want the weights as they are.
  BaseModel b = load_base_model(base.init_from, cfg, recipe->finetune, "fp32", held, over_group);
  // A share's fingerprint covers the dense part and its experts: the other ranks' experts complete it.
  const uint64_t fingerprint = held.all() || !check_base
                                   ? b.fingerprint
                                   : (b.fingerprint ^ b.experts_fingerprint) ^ over_group(b.experts_fingerprint);
  if (check_base && fingerprint != base.fingerprint)
    throw UserError(ckpt_dir + "/base.json: the base at " + base.init_from + " is not the one these adapters were trained on " +
                    "(fingerprint " + hex(fingerprint) + ", expected " + hex(base.fingerprint) + ")");
  attach_lora(b.model, recipe->finetune.lora, recipe->train.seed);
  load_model_weights(ckpt_dir, b.model);
  return b.model;
}

}  // namespace moeforge::train
