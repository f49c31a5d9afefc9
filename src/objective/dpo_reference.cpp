#include "objective/dpo_reference.h"

#include <torch/torch.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <memory>
#include <numeric>

#include "io/model_config_yaml.h"
#include "core/atomic_file.h"
#include "core/log.h"
#include "io/init_source.h"
#include "model/mixed.h"
#include "checkpoint/checkpoint.h"
#include "objective/dpo_objective.h"

namespace moeforge::train {

namespace fs = std::filesystem;

namespace {
const char* kTableNames[] = {"train_chosen", "train_rejected", "val_chosen", "val_rejected"};
}

DpoReference::DpoReference(const Recipe& r, const std::vector<data::PreferencePair>& train,
                           const std::vector<data::PreferencePair>& val)
    : r_(r), train_(train), val_(val) {}

void DpoReference::start(const std::string& run_dir, const torch::Device& device, bool main_rank,
                         MixtralForCausalLM& policy, const GroupXor& experts_xor) {
  if (r_.dpo.reference == "adapters_off") {
    MF_CHECK(has_adapters(policy), "adapters_off needs a policy with adapters (load_recipe checks the method)");
    return;
  }
  const std::string path = run_dir + "/reference_logps.json";
  const std::string fp = fingerprint();
  if (r_.dpo.reference == "precompute" && load_table(path, fp)) {
    MF_INFO("dpo: reference log-probs from " << path);
    return;
  }
  MixtralForCausalLM ref{nullptr};
  std::unique_ptr<AdaptersOffGuard> off;
  if (has_adapters(policy) && r_.dpo.reference == "precompute") {
    ref = policy;  // the base is the policy without its adapters: no second model
    off = std::make_unique<AdaptersOffGuard>(ref);
  } else {
    // Sharded exactly like the policy: the same share of the experts, read from init_from tensor by tensor,
    // routed through the policy's expert-parallel groups (no rank holds a whole second model).
    auto policy_blocks = policy->moe_blocks();
    const ExpertRange held = policy->held_experts();
    ref = MixtralForCausalLM(r_.model, OnLayerBuilt{}, held);
    load_init_weights(r_.init_from, ref, experts_xor);
    auto ref_blocks = ref->moe_blocks();
    for (size_t i = 0; i < ref_blocks.size() && !held.all(); ++i)
      ref_blocks[i]->set_dispatcher(policy_blocks[i]->shared_dispatcher(), ref_blocks[i]->experts);
    ref->to(device);
    ref->set_compute_dtype(compute_dtype_for(r_.runtime.precision));  // the policy's precision, train and val alike
    ref->eval();
    for (auto& p : ref->parameters()) p.requires_grad_(false);
  }
  if (r_.dpo.reference == "frozen") {
    ref_ = ref;
    return;
  }
  MF_INFO("dpo: computing the reference log-probs of " << train_.size() + val_.size() << " pairs into " << path);
  auto all = [](size_t n) {
    std::vector<size_t> v(n);
    std::iota(v.begin(), v.end(), 0);
    return v;
  };
  std::tie(table_[0], table_[1]) =
      reference_logps(ref, train_, all(train_.size()), r_.train.micro_batch_size, r_.train.seq_len, device);
  std::tie(table_[2], table_[3]) =
      reference_logps(ref, val_, all(val_.size()), r_.train.micro_batch_size, r_.train.seq_len, device);
  if (!main_rank) return;  // every rank computed the same table; rank 0 keeps it
  nlohmann::json j = {{"init_from", r_.init_from}, {"fingerprint", fp}};
  for (int k = 0; k < 4; ++k) {
    auto t = table_[k].to(torch::kDouble).contiguous();
    j[kTableNames[k]] = std::vector<double>(t.data_ptr<double>(), t.data_ptr<double>() + t.numel());
  }
  write_file_atomic(path, j.dump() + "\n");
}

std::pair<torch::Tensor, torch::Tensor> DpoReference::logps(bool training_set, const std::vector<size_t>& idx,
                                                            const torch::Device& d, MixtralForCausalLM& policy) {
  const auto& pairs = training_set ? train_ : val_;
  if (r_.dpo.reference == "adapters_off") {  // the same network, adapters off (and in eval mode: no dropout)
    AdaptersOffGuard off(policy);
    return reference_logps(policy, pairs, idx, static_cast<int64_t>(idx.size()), r_.train.seq_len, d);
  }
  if (!ref_.is_empty()) {
    return reference_logps(ref_, pairs, idx, static_cast<int64_t>(idx.size()), r_.train.seq_len, d);
  }
  const int table = training_set ? 0 : 2;
  auto ix = torch::tensor(std::vector<int64_t>(idx.begin(), idx.end()), torch::kLong);
  return {table_[table].index_select(0, ix), table_[table + 1].index_select(0, ix)};
}

// Identifies what the table was computed from: the init checkpoint (path, and the size and time of its
// files), the model config, the precision, seq_len, the token ids and masks.
std::string DpoReference::fingerprint() const {
  uint64_t h = 1469598103934665603ULL;
  auto mix = [&](uint64_t v) { h = (h ^ v) * 1099511628211ULL; };
  auto mix_str = [&](const std::string& s) {
    mix(s.size());
    for (char c : s) mix(static_cast<uint8_t>(c));
  };
  mix_str(r_.init_from);
  mix_str(io::model_config_to_yaml(r_.model));
  mix_str(r_.runtime.precision);
  const std::string dir = io::parse_init_source(r_.init_from).dir;
  std::error_code ec;
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(dir, ec))
    if (e.is_regular_file(ec)) files.push_back(e.path().string());
  std::sort(files.begin(), files.end());
  for (const auto& f : files) {
    mix_str(fs::path(f).filename().string());
    mix(static_cast<uint64_t>(fs::file_size(f, ec)));
    mix(static_cast<uint64_t>(fs::last_write_time(f, ec).time_since_epoch().count()));
  }
  mix(static_cast<uint64_t>(r_.train.seq_len));
  for (const auto* set : {&train_, &val_}) {
    mix(set->size());
    for (const auto& p : *set)
      for (const auto* e : {&p.chosen, &p.rejected}) {
        mix(e->ids.size());
        for (size_t i = 0; i < e->ids.size(); ++i) mix(static_cast<uint64_t>(e->ids[i]) * 2 + e->loss_mask[i]);
      }
  }
  return std::to_string(h);
}

// A table written by an earlier start of this run (resume); anything unreadable or stale is recomputed.
bool DpoReference::load_table(const std::string& path, const std::string& fp) {
  std::ifstream in(path);
  if (!in) return false;
  try {
    auto j = nlohmann::json::parse(in);
    if (j.at("fingerprint").get<std::string>() != fp) {
      MF_WARN(path << ": computed for other data or another init_from; recomputing");
      return false;
    }
    for (int k = 0; k < 4; ++k) {
      auto v = j.at(kTableNames[k]).get<std::vector<double>>();
      if (v.size() != (k < 2 ? train_.size() : val_.size())) return false;
      table_[k] = torch::tensor(v, torch::kDouble).to(torch::kFloat);
    }
    return true;
  } catch (const std::exception&) {
    MF_WARN(path << ": unreadable; recomputing");
    return false;
  }
}

}  // namespace moeforge::train
