#include "checkpoint/checkpoint.h"

#include <unistd.h>

#include <torch/torch.h>

#include <algorithm>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "io/model_config_yaml.h"
#include "core/atomic_file.h"
#include "core/error.h"
#include "core/log.h"
#include "io/init_source.h"
#include "model/finetune.h"
#include "model/mixed.h"
#include "model/param_count.h"
#include "model/param_names.h"
#include "parallel/layout.h"
#include "io/hf_checkpoint.h"
#include "io/hf_import.h"
#include "io/hf_config.h"
#include "io/safetensors.h"
#include "io/yaml_reader.h"
#include "checkpoint/base_model.h"
#include "checkpoint/manifest.h"
#include "optim/optimizer.h"

namespace moeforge::train {

namespace fs = std::filesystem;

namespace {

// Every write of a checkpoint is checked (a full disk is a UserError naming the file) and fsynced.
void write_text(const std::string& path, const std::string& text) { write_file(path, text); }

// A filesystem call's failure (create_directories or rename on a full disk) as a one-line UserError.
UserError fs_user_error(const fs::filesystem_error& e) {
  return UserError((e.path1().empty() ? std::string("checkpoint") : e.path1().string()) + ": " + e.code().message());
}

std::string step_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step_%08ld", static_cast<long>(step));
  return buf;
}

// A test hook: MOEFORGE_TEST_KILL_IN_CHECKPOINT=N kills the process (SIGKILL) halfway through
// writing the checkpoint of step N, to prove that the previous one survives.
void maybe_die(int64_t step) {
  const char* v = std::getenv("MOEFORGE_TEST_KILL_IN_CHECKPOINT");
  if (v && std::to_string(step) == v) std::raise(SIGKILL);
}

std::string shard_suffix(int k, int n) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "-%02d-of-%02d.safetensors", k, n);
  return buf;
}

std::string staging_for(const std::string& clean_dir) {
  return fs::path(clean_dir).parent_path().string() + "/.tmp-" + fs::path(clean_dir).filename().string() + "-sharded";
}

// The weight and optimizer files of a checkpoint: model.safetensors / optimizer.safetensors, plus the
// shard files its layout.json names (untrusted: plain file names that must exist).
std::vector<std::string> checkpoint_files(const std::string& ckpt_dir, const char* kind) {
  require_intact_checkpoint(ckpt_dir);  // every reader of weights or optimizer state comes through here
  std::vector<std::string> files{ckpt_dir + "/" + kind + ".safetensors"};
  const std::string lp = ckpt_dir + "/layout.json";
  if (!fs::exists(lp)) return files;
  std::ifstream in(lp);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
    const std::string key = std::string(kind) == "model" ? "weights" : "optimizer";
    files.clear();
    for (const auto& f : j.at(key)) {
      const auto name = f.get<std::string>();
      if (name.empty() || name.find('/') != std::string::npos || name[0] == '.')
        throw UserError(lp + ": file name '" + name + "' is not a plain file name");
      if (!fs::exists(ckpt_dir + "/" + name)) throw UserError(lp + ": names '" + name + "', which is missing");
      files.push_back(ckpt_dir + "/" + name);
    }
  } catch (const nlohmann::json::exception& e) {
    throw UserError(lp + ": invalid layout (" + std::string(e.what()).substr(0, 120) + ")");
  }
  if (files.empty()) throw UserError(lp + ": names no files");
  return files;
}

// The optimizer state as checkpoints hold it: a stacked expert adapter's state split into one entry per
// expert (per-expert names, like the adapters themselves), so that any layout can read it.
std::vector<std::pair<std::string, torch::Tensor>> saved_optimizer_state(const CheckpointContents& c) {
  auto st = c.optimizer->state();
  auto model = c.model;
  if (!has_adapters(model)) return st;
  std::map<std::string, StackedAdapter> stacked;
  for (auto& s : stacked_adapters(model)) stacked[s.param] = s;
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (auto& [k, v] : st) {
    const auto dot = k.find('.');
    auto it = stacked.find(k.substr(dot + 1));
    if (it == stacked.end()) {
      out.emplace_back(k, v);
      continue;
    }
    const std::string kind = k.substr(0, dot + 1);  // "exp_avg." / "exp_avg_sq." / "step."
    for (int64_t i = 0; i < it->second.count; ++i)
      out.emplace_back(kind + it->second.row_name(i), kind == "step." ? v : v.select(0, i));
  }
  return out;
}

// The reverse: per-expert entries stacked back into the state of this rank's stacked adapters.
void join_stacked_state(MixtralForCausalLM& model, std::map<std::string, torch::Tensor>& s) {
  for (auto& st : stacked_adapters(model))
    for (const std::string kind : {"exp_avg.", "exp_avg_sq.", "step."}) {
      std::vector<torch::Tensor> rows;
      for (int64_t i = 0; i < st.count; ++i) {
        auto it = s.find(kind + st.row_name(i));
        if (it == s.end()) return;  // AdamW::load_state names what is missing
        rows.push_back(it->second);
      }
      s[kind + st.param] = kind == "step." ? rows.front() : torch::stack(rows);
    }
}

}  // namespace

std::vector<std::string> checkpoint_weight_files(const std::string& ckpt_dir) { return checkpoint_files(ckpt_dir, "model"); }

std::vector<std::pair<std::string, torch::Tensor>> saved_parameters(MixtralForCausalLM& model) {
  if (has_adapters(model)) return adapter_tensors(model);
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (auto& p : model->named_parameters()) out.emplace_back(p.key(), p.value());
  return out;
}

// Sharded checkpoints (save_checkpoint with a layout): rank 0 prepares the staging directory of step_N, every
// other rank writes its files into it (`experts`: its expert shard, the first replica only), then rank 0
// writes the dense part and its own files and renames the whole into place.
static std::string sharded_staging_dir(const std::string& run_dir, int64_t step) {
  return staging_for(run_dir + "/checkpoints/" + step_name(step));
}

static std::string begin_sharded_checkpoint(const std::string& run_dir, int64_t step) {
  const std::string root = run_dir + "/checkpoints";
  fs::create_directories(root);
  for (auto& e : fs::directory_iterator(root))  // leftovers of a crashed write
    if (e.path().filename().string().rfind(".tmp-", 0) == 0) fs::remove_all(e.path());
  const std::string staging = sharded_staging_dir(run_dir, step);
  fs::create_directories(staging);
  fsync_path(root);
  return staging;
}

static void write_rank_files(const std::string& staging_dir, const CheckpointContents& c, bool experts) {
  if (c.optimizer && c.shard.optimizer_parts > 0) {  // ZeRO-1: the state this rank owns, whatever it is
    const std::string f = staging_dir + "/optimizer-part" + shard_suffix(c.shard.optimizer_part, c.shard.optimizer_parts);
    io::write_safetensors(f, saved_optimizer_state(c));
    fsync_path(f);
  }
  if (!experts || c.shard.expert_shards == 1) return;
  const std::string sfx = shard_suffix(c.shard.expert_shard, c.shard.expert_shards);
  std::vector<std::pair<std::string, torch::Tensor>> weights;
  auto model = c.model;
  for (auto& [k, v] : saved_parameters(model))
    if (is_expert_param(k)) weights.emplace_back(k, v.detach());
  io::write_safetensors(staging_dir + "/experts" + sfx, weights, {{"format", "pt"}});
  fsync_path(staging_dir + "/experts" + sfx);
  if (c.optimizer && c.shard.optimizer_parts == 0) {
    std::vector<std::pair<std::string, torch::Tensor>> st;
    for (auto& [k, v] : saved_optimizer_state(c))
      if (is_expert_param(k)) st.emplace_back(k, v);
    io::write_safetensors(staging_dir + "/optimizer-experts" + sfx, st);
    fsync_path(staging_dir + "/optimizer-experts" + sfx);
  }
}

// The files of a checkpoint, written into its temp (or staging) directory `tmp`.
static void write_checkpoint_files(const std::string& tmp, const CheckpointContents& c) {
  const bool sharded = c.sharded();
  if (sharded) {
    MF_CHECK(fs::is_directory(tmp), "begin_sharded_checkpoint prepared the staging directory");
    write_rank_files(tmp, c, true);
  } else {
    fs::remove_all(tmp);
  }
  fs::create_directories(tmp);
  write_text(tmp + "/config.yaml", io::model_config_to_yaml(*c.config));
  if (!c.recipe_yaml.empty()) write_text(tmp + "/recipe.yaml", c.recipe_yaml);
  if (!c.tokenizer_path.empty()) copy_file_checked(c.tokenizer_path, tmp + "/tokenizer.model");
  if (!c.base_json.empty()) write_text(tmp + "/base.json", c.base_json);
  std::vector<std::pair<std::string, torch::Tensor>> weights;
  auto model = c.model;
  for (auto& [k, v] : saved_parameters(model))
    if (c.shard.expert_shards == 1 || !is_expert_param(k)) weights.emplace_back(k, v.detach());
  for (auto& b : c.model->named_buffers()) weights.emplace_back(b.key(), b.value().detach());
  io::write_safetensors(tmp + "/model.safetensors", weights, {{"format", "pt"}});
  if (c.state) maybe_die(c.state->step);
  if (sharded) {
    nlohmann::json layout = {{"expert_parallel", c.shard.expert_shards}, {"data_parallel", c.shard.data_parallel}};
    layout["weights"] = {"model.safetensors"};
    if (c.optimizer) layout["optimizer"] = {"optimizer.safetensors"};
    auto add = [&](const char* key, const std::string& name) {
      if (!fs::exists(tmp + "/" + name)) throw UserError(tmp + ": " + name + " was not written");
      layout[key].push_back(name);
    };
    for (int k = 0; c.shard.expert_shards > 1 && k < c.shard.expert_shards; ++k) {
      add("weights", "experts" + shard_suffix(k, c.shard.expert_shards));
      if (c.optimizer && c.shard.optimizer_parts == 0) add("optimizer", "optimizer-experts" + shard_suffix(k, c.shard.expert_shards));
    }
    for (int k = 0; c.optimizer && k < c.shard.optimizer_parts; ++k)
      add("optimizer", "optimizer-part" + shard_suffix(k, c.shard.optimizer_parts));
    layout["zero"] = c.shard.optimizer_parts > 0 ? 1 : 0;
    write_text(tmp + "/layout.json", layout.dump(2) + "\n");
  }
  if (c.optimizer && c.state) {
    std::vector<std::pair<std::string, torch::Tensor>> st;
    for (auto& [k, v] : saved_optimizer_state(c))
      if (c.shard.optimizer_parts == 0 && (c.shard.expert_shards == 1 || !is_expert_param(k))) st.emplace_back(k, v);
    // The routers' jitter generators (rank 0's; every rank draws the same amount in pretraining).
    auto blocks = c.model->moe_blocks();
    for (size_t i = 0; i < blocks.size(); ++i)
      st.emplace_back("rng.router." + std::to_string(i), blocks[i]->gate->jitter_generator().get_state());
    if (c.model->lora_rt) st.emplace_back("rng.lora_dropout", c.model->lora_rt->gen.get_state());
    io::write_safetensors(tmp + "/optimizer.safetensors", st);
    nlohmann::json j = {{"step", c.state->step},         {"samples_seen", c.state->samples_seen},
                        {"tokens_seen", c.state->tokens_seen},
                        {"target_tokens_seen", c.state->target_tokens_seen}, {"seq_len", c.state->seq_len},
                        {"elapsed_s", c.state->elapsed_s}, {"seed", c.state->seed}};
    write_text(tmp + "/trainer_state.json", j.dump(2) + "\n");
  }
}

void write_expert_shard(const std::string& dir, const CheckpointContents& c) {
  MF_CHECK(c.shard.expert_shards > 1 && c.shard.expert_shard > 0, "share 0 is written by write_checkpoint_dir");
  std::string clean = dir;
  while (clean.size() > 1 && clean.back() == '/') clean.pop_back();
  const std::string staging = staging_for(clean);
  try {
    // The first share written (the last one) starts a fresh staging directory.
    if (c.shard.expert_shard == c.shard.expert_shards - 1) fs::remove_all(staging);
    fs::create_directories(staging);
    write_rank_files(staging, c, true);
  } catch (const fs::filesystem_error& e) {
    std::error_code ec;
    fs::remove_all(staging, ec);
    throw fs_user_error(e);
  } catch (...) {
    std::error_code ec;
    fs::remove_all(staging, ec);
    throw;
  }
}

void write_checkpoint_dir(const std::string& dir, const CheckpointContents& c) {
  std::string clean = dir;
  while (clean.size() > 1 && clean.back() == '/') clean.pop_back();
  // Sharded: the other shards are already in the staging directory (begin_sharded_checkpoint).
  const std::string tmp = c.sharded() ? staging_for(clean)
                                      : fs::path(clean).parent_path().string() + "/.tmp-" +
                                            fs::path(clean).filename().string() + "-" + std::to_string(::getpid());
  // A failed write (a full disk) removes the temp directory: nothing half-written stays, and nothing was renamed,
  // so whatever checkpoints there were are untouched. (A kill leaves the temp directory; the next write clears it.)
  auto discard = [&] {
    std::error_code ec;
    fs::remove_all(tmp, ec);
  };
  try {
    write_checkpoint_files(tmp, c);
    // Last, so that it hashes every file, the other ranks' included; read back, it describes what is on disk.
    write_manifest(tmp);
    fsync_path(tmp);
    if (fs::exists(clean)) fs::remove_all(clean);
    fs::rename(tmp, clean);
  } catch (const fs::filesystem_error& e) {
    discard();
    throw fs_user_error(e);
  } catch (...) {
    discard();
    throw;
  }
  fsync_path(fs::path(clean).parent_path().string());
}

// The step_N directory names under root, sorted (zero-padded, so by step).
static std::vector<std::string> step_dirs(const std::string& root) {
  std::vector<std::string> all;
  for (auto& e : fs::directory_iterator(root)) {
    auto n = e.path().filename().string();
    if (e.is_directory() && n.rfind("step_", 0) == 0) all.push_back(n);
  }
  std::sort(all.begin(), all.end());
  return all;
}

std::string save_checkpoint(const std::string& run_dir, const CheckpointContents& c, int keep) {
  MF_CHECK(c.state != nullptr, "training checkpoints carry their state");
  const std::string root = run_dir + "/checkpoints", name = step_name(c.state->step);
  const std::string dir = root + "/" + name;
  try {
    fs::create_directories(root);
    // Leftovers of a crashed write (sharded: begin_sharded_checkpoint cleaned them before the shards came).
    if (!c.sharded())
      for (auto& e : fs::directory_iterator(root))
        if (e.path().filename().string().rfind(".tmp-", 0) == 0) fs::remove_all(e.path());
    try {
      write_checkpoint_dir(dir, c);
    } catch (const UserError& e) {  // e.g. the disk is full: say what survived
      std::string before;
      for (const auto& n : step_dirs(root))
        if (n < name) before = n;
      throw UserError(std::string(e.what()) + (before.empty() ? " (no checkpoint was written)"
                                                               : " (the previous checkpoint, " + before + ", is untouched)"));
    }
    // Pruning keeps the newest `keep` of the checkpoints up to this one. This one is the newest of them and intact
    // (every write checked, its manifest computed from the files on disk). Newer step_N directories exist only when
    // the resume fell back past them (damaged, see latest_checkpoint): they are neither counted nor deleted, so
    // damaged checkpoints can never push an intact one out; the run overwrites each when it reaches its step.
    std::vector<std::string> older;
    for (const auto& n : step_dirs(root))
      if (n <= name) older.push_back(n);
    for (size_t i = 0; i + static_cast<size_t>(keep) < older.size(); ++i) fs::remove_all(root + "/" + older[i]);
  } catch (const fs::filesystem_error& e) {
    throw fs_user_error(e);
  }
  return dir;
}

std::string save_checkpoint(parallel::Layout& layout, const std::string& run_dir, CheckpointContents c, int keep) {
  MF_CHECK(c.state != nullptr, "training checkpoints carry their state");
  c.shard = layout.shard_placement();
  const int64_t step = c.state->step;
  layout.write_checkpoint([&] { begin_sharded_checkpoint(run_dir, step); },
                          [&] { write_rank_files(sharded_staging_dir(run_dir, step), c, c.shard.writes_experts); },
                          [&] { save_checkpoint(run_dir, c, keep); });
  return run_dir + "/checkpoints/" + step_name(step);
}

std::string checkpoint_dir(const std::string& run_dir, int64_t step) { return run_dir + "/checkpoints/" + step_name(step); }

std::optional<std::string> latest_checkpoint(const std::string& run_dir) {
  const std::string root = run_dir + "/checkpoints";
  if (!fs::exists(root)) return std::nullopt;
  auto all = step_dirs(root);
  for (auto it = all.rbegin(); it != all.rend(); ++it) {
    const std::string dir = root + "/" + *it;
    // Without a manifest and without weights: not a checkpoint (as before manifests).
    if (!fs::exists(dir + "/model.safetensors") && !fs::exists(dir + "/" + kManifestFile)) continue;
    const CheckpointCheck check = verify_checkpoint_once(dir);
    if (check.ok) return dir;
    MF_WARN(check.message(dir) << "; the checkpoint is damaged, falling back to the one before it");
  }
  return std::nullopt;
}

CheckpointTensors::CheckpointTensors(const std::string& ckpt, const ModelConfig& cfg) {
  for (const auto& path : checkpoint_weight_files(ckpt)) {
    files_.push_back(io::SafetensorsFile::open(path));
    for (const auto& n : files_.back().names()) file_of_.emplace(n, files_.size() - 1);
  }
  for (const auto& [n, shape] : parameter_shapes(cfg)) {
    auto it = file_of_.find(n);
    if (it == file_of_.end()) throw UserError(ckpt + ": tensor '" + n + "' is missing from its weight files");
    const auto& e = files_[it->second].entry(n);
    if (e.shape != shape)
      throw UserError(files_[it->second].path() + ": tensor '" + n + "' has shape " + c10::str(c10::IntArrayRef(e.shape)) +
                      ", its config.yaml gives " + c10::str(c10::IntArrayRef(shape)));
  }
}

at::Tensor CheckpointTensors::get(const std::string& n) const {
  auto it = file_of_.find(n);
  MF_CHECK(it != file_of_.end(), "a tensor of the checkpoint: " + n);
  return files_[it->second].get(n);
}

void load_model_weights(const std::string& ckpt_dir, MixtralForCausalLM& model) {
  std::vector<io::SafetensorsFile> files;
  std::map<std::string, std::string> seen;  // tensor -> file: a tensor in two files is a broken layout
  for (const auto& path : checkpoint_files(ckpt_dir, "model")) {
    files.push_back(io::SafetensorsFile::open(path));
    for (const auto& n : files.back().names())
      if (!seen.emplace(n, path).second)
        throw UserError(path + ": tensor '" + n + "' is also in " + seen[n] + "; the checkpoint's layout is inconsistent");
  }
  torch::NoGradGuard ng;
  auto copy_in = [&](const std::string& name, torch::Tensor& dst, bool required) {
    const io::SafetensorsFile* f = nullptr;
    for (const auto& x : files)
      if (x.contains(name)) f = &x;
    if (!f) {
      if (required)
        throw UserError(files.front().path() + (files.size() > 1 ? " (and its expert shards)" : "") + ": tensor '" +
                        name + "' is missing");
      return;
    }
    auto t = f->get(name);
    if (t.sizes() != dst.sizes())
      throw UserError(f->path() + ": tensor '" + name + "' has shape " + c10::str(t.sizes()) + ", the model expects " +
                      c10::str(dst.sizes()));
    dst.copy_(t.to(dst.scalar_type()));
  };
  for (auto& [k, v] : saved_parameters(model)) copy_in(k, v, true);
  for (auto& b : model->named_buffers()) copy_in(b.key(), b.value(), false);
}

std::string init_tokenizer(const std::string& init_from) {
  return checkpoint_tokenizer(io::parse_init_source(init_from).dir);
}

void load_init_weights(const std::string& init_from, MixtralForCausalLM& model, const GroupXor& over_group) {
  const auto src = io::parse_init_source(init_from);
  if (!src.hf) require_intact_checkpoint(src.dir);
  // What the shape checks below cannot see: parts of the source the model has no place for would be dropped.
  if (!src.hf) {
    const ModelConfig from = read_checkpoint_config(src.dir), &to = model->config();
    auto parts = [](const ModelConfig& c) {
      return std::to_string(c.moe.num_shared_experts) + " shared expert(s)" +
             (c.moe.num_shared_experts > 0 ? (c.moe.shared_expert_gate ? " with their gate" : " without a gate") : "");
    };
    if (from.moe.num_shared_experts != to.moe.num_shared_experts ||
        (from.moe.num_shared_experts > 0 && from.moe.shared_expert_gate != to.moe.shared_expert_gate))
      throw UserError(src.dir + ": has " + parts(from) + " per layer; the recipe's model has " + parts(to) +
                      " (set model.moe.num_shared_experts / shared_expert_gate as the checkpoint has them)");
    if (!from.tie_word_embeddings && to.tie_word_embeddings)
      throw UserError(src.dir + ": has its own lm_head; the recipe's model ties it to the embedding "
                      "(tie_word_embeddings: false, as the checkpoint)");
  }
  if (src.hf) {
    io::load_hf_weights(src.dir, model);
  } else if (auto base = read_base_pointer(src.dir)) {  // an adapter checkpoint: its merged model
    auto adapted = load_adapter_checkpoint_model(src.dir, *base, model->held_experts(), over_group);
    auto merged = merged_weights(adapted);
    std::map<std::string, torch::Tensor> m(merged.begin(), merged.end());
    torch::NoGradGuard ng;
    for (auto& p : model->named_parameters()) {
      auto it = m.find(p.key());
      if (it == m.end() || it->second.sizes() != p.value().sizes())
        throw UserError(src.dir + ": its merged model has no tensor '" + p.key() + "' of shape " + c10::str(p.value().sizes()));
      p.value().copy_(it->second);
    }
    auto bufs = adapted->named_buffers();
    for (auto& b : model->named_buffers())
      if (bufs.contains(b.key())) b.value().copy_(bufs[b.key()]);
  } else {
    load_model_weights(src.dir, model);
  }
}

std::optional<TrainerState> checkpoint_trainer_state(const std::string& ckpt_dir) {
  const std::string sp = ckpt_dir + "/trainer_state.json";
  std::ifstream in(sp);
  if (!in) return std::nullopt;
  TrainerState state;
  try {
    auto j = nlohmann::json::parse(in);
    state.step = j.at("step").get<int64_t>();
    state.samples_seen = j.at("samples_seen").get<int64_t>();
    state.tokens_seen = j.at("tokens_seen").get<int64_t>();
    state.target_tokens_seen = j.value("target_tokens_seen", state.tokens_seen);
    state.seq_len = j.at("seq_len").get<int64_t>();
    state.elapsed_s = j.at("elapsed_s").get<double>();
    state.seed = j.at("seed").get<uint64_t>();
  } catch (const nlohmann::json::exception& e) {
    throw UserError(sp + ": invalid trainer state");
  }
  if (state.step < 0 || state.samples_seen < 0 || state.seq_len <= 0) throw UserError(sp + ": invalid trainer state");
  return state;
}

std::optional<Recipe> checkpoint_recipe(const std::string& ckpt_dir) {
  const std::string p = ckpt_dir + "/recipe.yaml";
  if (!fs::exists(p)) return std::nullopt;
  return load_recipe(p, {});
}

void load_training_state(const std::string& ckpt_dir, AdamW& opt, TrainerState& state, MixtralForCausalLM& model) {
  auto st = checkpoint_trainer_state(ckpt_dir);
  if (!st) throw UserError(ckpt_dir + "/trainer_state.json: missing; this checkpoint holds weights only and cannot be resumed");
  state = *st;
  std::map<std::string, torch::Tensor> s;
  for (const auto& path : checkpoint_files(ckpt_dir, "optimizer")) {
    auto f = io::SafetensorsFile::open(path);
    for (const auto& n : f.names()) {
      if (s.count(n)) throw UserError(path + ": optimizer state '" + n + "' is in two files of the layout");
      s[n] = f.get(n);
    }
  }
  join_stacked_state(model, s);
  opt.load_state(s, ckpt_dir + "/optimizer*.safetensors");
  if (model->lora_rt && s.count("rng.lora_dropout")) {
    auto& g = model->lora_rt->gen;
    std::lock_guard<std::mutex> lock(g.mutex());
    try {
      g.set_state(s["rng.lora_dropout"]);
    } catch (const c10::Error&) {
      throw UserError(ckpt_dir + "/optimizer.safetensors: 'rng.lora_dropout' is not a generator state");
    }
  }
  auto blocks = model->moe_blocks();
  for (size_t i = 0; i < blocks.size(); ++i) {
    const std::string k = "rng.router." + std::to_string(i);
    if (!s.count(k)) continue;  // written before the routers had their own generators: a fresh stream
    auto& g = blocks[i]->gate->jitter_generator();
    std::lock_guard<std::mutex> lock(g.mutex());
    try {
      g.set_state(s[k]);
    } catch (const c10::Error&) {
      throw UserError(ckpt_dir + "/optimizer.safetensors: '" + k + "' is not a generator state");
    }
  }
}

std::string checkpoint_tokenizer(const std::string& ckpt_dir) {
  const std::string p = ckpt_dir + "/tokenizer.model";
  return fs::exists(p) ? p : "";
}

std::string require_checkpoint_tokenizer(const std::string& ckpt_dir, const std::string& purpose) {
  std::string p = checkpoint_tokenizer(ckpt_dir);
  if (p.empty()) throw UserError(ckpt_dir + ": has no tokenizer.model; " + purpose + " needs one");
  return p;
}

std::string checkpoint_precision(const std::string& ckpt_dir) {
  auto r = checkpoint_recipe(ckpt_dir);
  return r ? r->runtime.precision : "fp32";
}

MixtralForCausalLM load_checkpoint_model(const std::string& ckpt_dir, const std::string& precision) {
  require_intact_checkpoint(ckpt_dir);  // before its base, its config or its recipe is read
  MixtralForCausalLM model{nullptr};
  if (auto base = read_base_pointer(ckpt_dir)) {
    model = load_adapter_checkpoint_model(ckpt_dir, *base);
  } else {
    model = MixtralForCausalLM(read_checkpoint_config(ckpt_dir));
    load_model_weights(ckpt_dir, model);
  }
  model->set_compute_dtype(compute_dtype_for(precision.empty() ? checkpoint_precision(ckpt_dir) : precision));
  return model;
}

}  // namespace moeforge::train
