#include "io/hf_checkpoint.h"

#include <ATen/ATen.h>
#include <malloc.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <nlohmann/json.hpp>
#include <map>
#include <set>

#include "core/atomic_file.h"
#include "core/error.h"
#include "io/hf_config.h"
#include "model/param_names.h"

namespace moeforge::io {

namespace fs = std::filesystem;

uint64_t parse_size(const std::string& s, const std::string& what) {
  size_t i = 0;
  while (i < s.size() && (std::isdigit(static_cast<unsigned char>(s[i])) || s[i] == '.')) ++i;
  if (i == 0) throw UserError(what + ": expected a size like 5GB, 500MB or 1000000, got '" + s + "'");
  double v = std::stod(s.substr(0, i));
  std::string unit = s.substr(i);
  for (auto& ch : unit) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  double mult = unit.empty() || unit == "B" ? 1 : unit == "KB" ? 1e3 : unit == "MB" ? 1e6 : unit == "GB" ? 1e9
              : unit == "KIB" ? 1024.0 : unit == "MIB" ? 1048576.0 : unit == "GIB" ? 1073741824.0 : -1;
  if (mult < 0) throw UserError(what + ": unknown size unit '" + s.substr(i) + "' (use B, KB, MB, GB, KiB, MiB, GiB)");
  if (v * mult < 1) throw UserError(what + ": size must be positive");
  return static_cast<uint64_t>(v * mult);
}

const char* mistral_chat_template() {
  // <s>[INST] {system}\n\n{user} [/INST]{assistant}</s>[INST] {user} [/INST]...
  return "{{ bos_token }}{% set ns = namespace(system='') %}"
         "{% for message in messages %}"
         "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\\n\\n' %}"
         "{% elif message['role'] == 'user' %}"
         "{{ '[INST] ' + ns.system + message['content'] + ' [/INST]' }}{% set ns.system = '' %}"
         "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
         "{% else %}{{ raise_exception('Only system, user and assistant roles are supported') }}{% endif %}"
         "{% endfor %}";
}

std::string dense_hf_name(const std::string& ours) {
  static const std::pair<const char*, const char*> kMlp[] = {{".block_sparse_moe.experts.0.w1.", ".mlp.gate_proj."},
                                                             {".block_sparse_moe.experts.0.w3.", ".mlp.up_proj."},
                                                             {".block_sparse_moe.experts.0.w2.", ".mlp.down_proj."}};
  for (const auto& [from, to] : kMlp) {
    const auto p = ours.find(from);
    if (p != std::string::npos) return ours.substr(0, p) + to + ours.substr(p + std::string(from).size());
  }
  if (ours.find(".block_sparse_moe.gate.") != std::string::npos) return "";
  return ours;
}

std::string qwen2_moe_hf_name(const std::string& ours) {
  static const std::string key = ".block_sparse_moe.";
  const auto p = ours.find(key);
  if (p == std::string::npos) return ours;
  std::string out = ours.substr(0, p) + ".mlp.", part;
  std::istringstream rest(ours.substr(p + key.size()));
  bool first = true;
  while (std::getline(rest, part, '.')) {
    if (part == "w1") part = "gate_proj";
    else if (part == "w3") part = "up_proj";
    else if (part == "w2") part = "down_proj";
    out += (first ? "" : ".") + part;
    first = false;
  }
  return out;
}

std::string hf_architecture(const ModelConfig& c) {
  if (c.dense()) return "MistralForCausalLM";
  if (c.moe.num_shared_experts == 0) return "MixtralForCausalLM";
  const std::string why = "a config with shared experts exports as Qwen2MoeForCausalLM, ";
  if (!c.moe.shared_expert_gate)
    throw UserError(why + "whose shared expert always has its sigmoid gate; this one has moe.shared_expert_gate: false "
                          "(no Hugging Face architecture here holds an ungated shared expert)");
  if (c.sliding_window)
    throw UserError(why + "whose sliding window applies per layer range (use_sliding_window, max_window_layers); "
                          "this config's sliding_window is not exported there");
  if (c.resolved_head_dim() * c.num_attention_heads != c.hidden_size)
    throw UserError(why + "which derives the head width from hidden_size / num_attention_heads; this config's "
                          "head_dim is " + std::to_string(c.resolved_head_dim()));
  return "Qwen2MoeForCausalLM";
}

namespace {

// Inside the export's temp directory: every write checked, fsynced (write_dir_atomic renames the directory).
void write_json(const std::string& path, const nlohmann::json& j) { write_file(path, j.dump(2) + "\n"); }

at::ScalarType export_dtype(const std::string& d) {
  if (d == "bf16") return at::kBFloat16;
  if (d == "fp16") return at::kHalf;
  if (d == "fp32") return at::kFloat;
  throw UserError("--dtype must be bf16, fp16 or fp32, got '" + d + "'");
}

}  // namespace

void export_hf(const ModelConfig& c, const std::vector<std::pair<std::string, at::Tensor>>& weights,
               const HfExportOptions& opt) {
  WeightStream ws;
  std::map<std::string, at::Tensor> by_name;
  for (const auto& [n, t] : weights) {
    ws.shapes.push_back({n, t.sizes().vec()});
    by_name[n] = t;
  }
  ws.get = [&](const std::string& n) { return by_name.at(n); };
  export_hf(c, ws, opt);
}

namespace {
void write_hf_dir(const ModelConfig& c, const WeightStream& weights, const HfExportOptions& opt);
}  // namespace

namespace {
// `weights` under the names `rename` gives ("" leaves a tensor out), each followed by the zero tensors `zeros_after`
// lists for it (name, length): the architectures whose names or tensors differ from Mixtral's.
WeightStream renamed_stream(
    const WeightStream& weights, const std::function<std::string(const std::string&)>& rename,
    const std::function<std::vector<std::pair<std::string, int64_t>>(const std::string&, const std::vector<int64_t>&)>&
        zeros_after = nullptr) {
  WeightStream out;
  auto ours = std::make_shared<std::map<std::string, std::string>>();
  auto zeros = std::make_shared<std::map<std::string, int64_t>>();
  for (const auto& [n, shape] : weights.shapes) {
    const std::string hf = rename(n);
    if (hf.empty()) continue;
    out.shapes.push_back({hf, shape});
    (*ours)[hf] = n;
    if (!zeros_after) continue;
    for (const auto& [z, len] : zeros_after(n, shape)) {
      out.shapes.push_back({z, {len}});
      (*zeros)[z] = len;
    }
  }
  out.get = [ours, zeros, get = weights.get](const std::string& hf) {
    if (auto z = zeros->find(hf); z != zeros->end()) return at::zeros({z->second}, at::kFloat);
    return get(ours->at(hf));
  };
  return out;
}
}  // namespace

void export_hf(const ModelConfig& c, const WeightStream& weights, const HfExportOptions& opt) {
  if (hf_architecture(c) == "Qwen2MoeForCausalLM") {
    // Qwen2-MoE's names; its attention has q/k/v biases, written as zeros (ours has none).
    write_hf_dir(c, renamed_stream(weights, qwen2_moe_hf_name, [](const std::string& n, const std::vector<int64_t>& shape) {
                   std::vector<std::pair<std::string, int64_t>> biases;
                   for (const std::string tail : {".self_attn.q_proj.weight", ".self_attn.k_proj.weight", ".self_attn.v_proj.weight"})
                     if (n.size() > tail.size() && n.compare(n.size() - tail.size(), tail.size(), tail) == 0)
                       biases.push_back({n.substr(0, n.size() - 6) + "bias", shape.at(0)});
                   return biases;
                 }),
                 opt);
    return;
  }
  // MistralForCausalLM: the MLP under its own names, no router.
  write_hf_dir(c, c.dense() ? renamed_stream(weights, dense_hf_name) : weights, opt);
}

namespace {
// The directory, with every tensor under the name it has in `weights`.
void write_hf_dir(const ModelConfig& c, const WeightStream& weights, const HfExportOptions& opt) {
  const auto dtype = export_dtype(opt.dtype);
  const std::string out = without_trailing_slashes(opt.out_dir);  // the name errors give
  write_dir_atomic(out, [&](const std::string& tmp) {
    const std::string torch_dtype = dtype == at::kBFloat16 ? "bfloat16" : dtype == at::kHalf ? "float16" : "float32";
    write_json(tmp + "/config.json", to_hf_config(c, torch_dtype));
    write_json(tmp + "/generation_config.json", {{"_from_model_config", true}, {"bos_token_id", 1}, {"eos_token_id", 2}});
    // Shards: tensors in model order, a new shard when the next tensor would overflow the limit.
    std::vector<std::vector<size_t>> shards(1);
    uint64_t cur = 0, total = 0;
    const uint64_t elem = at::elementSize(dtype);
    const auto& shapes = weights.shapes;
    for (size_t i = 0; i < shapes.size(); ++i) {
      uint64_t numel = 1;
      for (int64_t d : shapes[i].second) numel *= static_cast<uint64_t>(d);
      uint64_t bytes = numel * elem;
      if (!shards.back().empty() && cur + bytes > opt.max_shard_bytes) {
        shards.emplace_back();
        cur = 0;
      }
      shards.back().push_back(i);
      cur += bytes;
      total += bytes;
    }
    nlohmann::json weight_map = nlohmann::json::object();
    for (size_t s = 0; s < shards.size(); ++s) {
      char name[64];
      if (shards.size() == 1) std::snprintf(name, sizeof name, "model.safetensors");
      else std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", s + 1, shards.size());
      std::vector<std::pair<std::string, at::Tensor>> part;
      for (size_t i : shards[s]) {
        auto t = weights.get(shapes[i].first);
        if (t.sizes().vec() != shapes[i].second)
          throw UserError(out + ": tensor '" + shapes[i].first + "' has shape " + c10::str(t.sizes()) + ", expected " +
                          c10::str(c10::IntArrayRef(shapes[i].second)));
        part.emplace_back(shapes[i].first, t.detach().to(at::kCPU).to(dtype).contiguous());
        weight_map[shapes[i].first] = name;
      }
      write_safetensors(tmp + "/" + name, part, {{"format", "pt"}});
      part.clear();
      ::malloc_trim(0);  // the shard's copies go back to the system before the next shard is read
    }
    if (shards.size() > 1)
      write_json(tmp + "/model.safetensors.index.json", {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}});
    if (!opt.tokenizer_path.empty()) {
      copy_file_checked(opt.tokenizer_path, tmp + "/tokenizer.model");
      write_json(tmp + "/tokenizer_config.json",
                 {{"tokenizer_class", "LlamaTokenizer"}, {"add_bos_token", true}, {"add_eos_token", false},
                  {"bos_token", "<s>"}, {"eos_token", "</s>"}, {"unk_token", "<unk>"}, {"pad_token", nullptr},
                  {"legacy", false}, {"clean_up_tokenization_spaces", false}, {"spaces_between_special_tokens", false},
                  {"model_max_length", c.max_position_embeddings}, {"chat_template", mistral_chat_template()}});
      write_json(tmp + "/special_tokens_map.json", {{"bos_token", "<s>"}, {"eos_token", "</s>"}, {"unk_token", "<unk>"}});
    }
  });
}
}  // namespace

HfCheckpoint::HfCheckpoint(const std::string& dir) : dir_(dir) {
  if (!fs::is_directory(dir)) throw UserError(dir + ": not a directory (expected a Hugging Face model directory)");
  config_ = read_hf_config_file(dir + "/config.json");
  if (config_.name == "unnamed") config_.name = fs::path(dir).filename().string();
  std::vector<std::string> files;
  const std::string index = dir + "/model.safetensors.index.json";
  if (fs::exists(index)) {
    std::ifstream in(index);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception&) {
      throw UserError(index + ": invalid JSON");
    }
    if (!j.contains("weight_map") || !j["weight_map"].is_object()) throw UserError(index + ": no 'weight_map' object");
    std::set<std::string> uniq;
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      if (!it.value().is_string()) throw UserError(index + ": weight_map values must be file names");
      std::string f = it.value().get<std::string>();
      if (f.find('/') != std::string::npos || f.find("..") != std::string::npos)
        throw UserError(index + ": shard name '" + f + "' must be a plain file name");
      uniq.insert(f);
    }
    files.assign(uniq.begin(), uniq.end());
  } else if (fs::exists(dir + "/model.safetensors")) {
    files.push_back("model.safetensors");
  } else {
    for (auto& e : fs::directory_iterator(dir))
      if (e.path().extension() == ".safetensors") files.push_back(e.path().filename().string());
    std::sort(files.begin(), files.end());
  }
  if (files.empty()) throw UserError(dir + ": no .safetensors weights (pickled .bin checkpoints are not read)");
  for (const auto& f : files) {
    files_.push_back(std::make_unique<SafetensorsFile>(SafetensorsFile::open(dir + "/" + f)));
    for (const auto& n : files_.back()->names()) {
      if (where_.count(n)) throw UserError(dir + "/" + f + ": tensor '" + n + "' also appears in another shard");
      where_[n] = files_.size() - 1;
    }
  }
  // A Mistral / Llama directory has its MLP under mlp.*; a Mixtral of one expert (num_local_experts: 1) keeps the
  // Mixtral layout and reads as such.
  if (config_.dense() && where_.count("model.layers.0.mlp.gate_proj.weight")) {
    layout_ = "dense";
  } else if (where_.count("model.layers.0.block_sparse_moe.gate.weight")) layout_ = "per-expert";
  else if (where_.count("model.layers.0.mlp.experts.gate_up_proj")) layout_ = "fused";
  else throw UserError(dir + ": neither the per-expert (block_sparse_moe.experts.E.w1) nor the fused "
                             "(mlp.experts.gate_up_proj) Mixtral layout found" +
                       std::string(config_.dense() ? ", nor a dense model's MLP (mlp.gate_proj)" : ""));
}

const SafetensorsFile* HfCheckpoint::file_of(const std::string& n) const {
  auto it = where_.find(n);
  return it == where_.end() ? nullptr : files_[it->second].get();
}

at::Tensor HfCheckpoint::stored(const std::string& n) const {
  const SafetensorsFile* f = file_of(n);
  if (!f) throw UserError(dir_ + ": tensor '" + n + "' is missing");
  auto t = f->get(n);
  if (!at::isFloatingType(t.scalar_type())) throw UserError(f->path() + ": tensor '" + n + "' is not floating point");
  return t.to(at::kFloat);
}

at::Tensor HfCheckpoint::stored_expert(const std::string& n, int64_t e, int64_t rows, int64_t cols) const {
  const SafetensorsFile* f = file_of(n);
  if (!f) throw UserError(dir_ + ": tensor '" + n + "' is missing");
  const int64_t E = config_.moe.num_experts;
  const auto& shape = f->entry(n).shape;
  if (shape != std::vector<int64_t>{E, rows, cols})
    throw UserError(f->path() + ": " + n + " must have shape [" + std::to_string(E) + ", " + std::to_string(rows) + ", " +
                    std::to_string(cols) + "] (experts, rows, columns of this config)");
  if (e < 0 || e >= E) throw UserError(dir_ + ": no expert " + std::to_string(e) + " in '" + n + "'");
  auto t = f->get_rows(n, e, 1);
  if (!at::isFloatingType(t.scalar_type())) throw UserError(f->path() + ": tensor '" + n + "' is not floating point");
  return t[0].to(at::kFloat);
}

namespace {
// "model.layers.3.block_sparse_moe.gate.weight": a layer's router.
bool is_dense_router(const std::string& n) {
  const std::string key = ".block_sparse_moe.gate.weight";
  return n.rfind("model.layers.", 0) == 0 && n.size() > key.size() && n.compare(n.size() - key.size(), key.size(), key) == 0;
}

// An expert parameter's layer prefix, expert id and matrix ("w1", "w2", "w3").
bool parse_expert_name(const std::string& n, std::string* layer_prefix, int64_t* expert, std::string* w) {
  const auto p = parse_expert_param(n);
  if (!p) return false;
  *layer_prefix = p->layer;
  *expert = p->expert;
  *w = p->rest.substr(0, 2);
  return true;
}
}  // namespace

bool HfCheckpoint::has(const std::string& name) const {
  if (layout_ == "per-expert") return where_.count(name) > 0;
  if (layout_ == "dense") {
    const std::string hf = dense_hf_name(name);
    return hf.empty() ? is_dense_router(name) : where_.count(hf) > 0;
  }
  std::string prefix, w;
  int64_t e;
  if (parse_expert_name(name, &prefix, &e, &w))
    return where_.count(prefix + (w == "w2" ? ".mlp.experts.down_proj" : ".mlp.experts.gate_up_proj")) > 0;
  std::string n = name;
  auto p = n.find(".block_sparse_moe.");
  if (p != std::string::npos) n.replace(p, 18, ".mlp.");
  return where_.count(n) > 0;
}

at::Tensor HfCheckpoint::get(const std::string& name) const {
  if (layout_ == "per-expert") return stored(name);
  if (layout_ == "dense") {
    const std::string hf = dense_hf_name(name);
    if (!hf.empty()) return stored(hf);
    if (!is_dense_router(name)) throw UserError(dir_ + ": tensor '" + name + "' is missing");
    return at::zeros({1, config_.hidden_size}, at::kFloat);  // one expert: its weight is 1 whatever the logit
  }
  std::string prefix, w;
  int64_t e;
  if (parse_expert_name(name, &prefix, &e, &w)) {
    const int64_t I = config_.intermediate_size, H = config_.hidden_size;
    if (w == "w2") return stored_expert(prefix + ".mlp.experts.down_proj", e, H, I);
    auto t = stored_expert(prefix + ".mlp.experts.gate_up_proj", e, 2 * I, H);
    // w1 (gate) rows first, then w3 (up); a narrow of dim 0 is contiguous: no copy beyond the row read.
    return t.narrow(0, w == "w1" ? 0 : I, I);
  }
  std::string n = name;
  auto p = n.find(".block_sparse_moe.");
  if (p != std::string::npos) n.replace(p, 18, ".mlp.");
  return stored(n);
}

std::vector<std::string> HfCheckpoint::unexplained(const std::vector<std::string>& expected) const {
  std::set<std::string> used;
  for (const auto& name : expected) {
    std::string prefix, w;
    int64_t e;
    if (layout_ == "fused" && parse_expert_name(name, &prefix, &e, &w)) {
      used.insert(prefix + (w == "w2" ? ".mlp.experts.down_proj" : ".mlp.experts.gate_up_proj"));
      continue;
    }
    if (layout_ == "dense") {
      used.insert(dense_hf_name(name));
      continue;
    }
    std::string n = name;
    auto p = n.find(".block_sparse_moe.");
    if (layout_ == "fused" && p != std::string::npos) n.replace(p, 18, ".mlp.");
    used.insert(n);
  }
  std::vector<std::string> out;
  for (const auto& [n, i] : where_) {
    if (used.count(n)) continue;
    const std::string buf = "rotary_emb.inv_freq";  // a buffer older transformers saved
    if (n.size() >= buf.size() && n.compare(n.size() - buf.size(), buf.size(), buf) == 0) continue;
    out.push_back(n);
  }
  return out;
}

std::string HfCheckpoint::tokenizer_path() const {
  return fs::exists(dir_ + "/tokenizer.model") ? dir_ + "/tokenizer.model" : "";
}

}  // namespace moeforge::io
