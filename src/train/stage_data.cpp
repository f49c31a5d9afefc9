#include "train/stage_data.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>

#include "core/compat.h"
#include "core/error.h"
#include "core/log.h"
#include "data/lm_dataset.h"
#include "data/sft_dataset.h"
#include "data/preference.h"
#include "train/checkpoint.h"
#include "train/dpo_objective.h"
#include "train/lm_objective.h"
#include "train/sft_objective.h"
#include "train/trainer.h"

namespace moeforge::train {

namespace fs = std::filesystem;

namespace {

class PretrainData : public StageData {
 public:
  explicit PretrainData(const Recipe& r) : r_(r) {
    const auto& cfg = r.model;
    auto train_ds = std::make_shared<data::TokenDataset>(r.data_dir, "train");
    auto val_ds = std::make_shared<data::TokenDataset>(r.data_dir, "val");
    if (train_ds->meta().vocab_size > cfg.vocab_size)
      throw UserError(r.path + ": key 'model.vocab_size': the data's tokenizer has " +
                      std::to_string(train_ds->meta().vocab_size) + " tokens, more than the model's " +
                      std::to_string(cfg.vocab_size));
    tokenizer_ = r.tokenizer.empty() ? r.data_dir + "/" + train_ds->meta().tokenizer : r.tokenizer;
    if (!fs::exists(tokenizer_)) throw UserError(tokenizer_ + ": tokenizer model not found");
    const auto& tc = r.train;
    train_ = std::make_unique<data::LmSampler>(std::make_shared<data::TokenStream>(train_ds), tc.seq_len, tc.seed, true);
    val_ = std::make_unique<data::LmSampler>(std::make_shared<data::TokenStream>(val_ds), tc.seq_len, tc.seed, false);
    if (train_->num_windows() == 0)
      throw UserError(r.data_dir + ": the training split has fewer than seq_len + 1 = " + std::to_string(tc.seq_len + 1) +
                      " tokens");
    if (val_->num_windows() == 0)
      throw UserError(r.data_dir + ": the validation split has fewer than seq_len + 1 = " +
                      std::to_string(tc.seq_len + 1) + " tokens; prepare with a larger --val-fraction");
  }
  std::string describe() const override { return std::to_string(train_->num_windows()) + " training windows"; }
  const std::string& tokenizer() const override { return tokenizer_; }
  BatchLoss train_batch(MixtralForCausalLM& m, int64_t first, int64_t b, const torch::Device& d) override {
    return lm_loss(m, train_->batch(first, b), d);
  }
  EvalResult evaluate(MixtralForCausalLM& m, int64_t b, int64_t max_batches, const torch::Device& d) override {
    return evaluate_lm(m, *val_, b, max_batches, d);
  }
  void summarize(nlohmann::json& s) override { s["unigram_entropy"] = unigram_entropy(r_.data_dir, "val"); }

 private:
  const Recipe& r_;
  std::string tokenizer_;
  std::unique_ptr<data::LmSampler> train_, val_;
};

// Examples shuffled per epoch (seeded), then packed first-fit into rows of seq_len predictions;
// a sample is a row, so resuming needs only the global row index.
class SftData : public StageData {
 public:
  explicit SftData(const Recipe& r) : r_(r) {
    tokenizer_ = r.tokenizer;
    if (tokenizer_.empty() && !r.init_from.empty()) tokenizer_ = init_tokenizer(r.init_from);
    if (tokenizer_.empty())
      throw UserError(r.path + ": key 'tokenizer': stage sft needs a tokenizer (set it, or init_from a checkpoint that has one)");
    data::Tokenizer tok(tokenizer_);
    if (tok.vocab_size() > r.model.vocab_size)
      throw UserError(tokenizer_ + ": has more pieces than the model's vocab_size");
    data::SftOptions o;
    o.max_len = r.train.seq_len;
    o.train_on_all = r.sft_train_on_all;
    o.overlong = r.sft_overlong;
    train_ex_ = data::load_sft_examples(r.sft_train, tok, o, &train_stats_);
    val_ex_ = data::load_sft_examples(r.sft_val, tok, o, &val_stats_);
    val_rows_ = data::pack_rows(val_ex_, r.train.seq_len);
    MF_INFO("sft: " << train_stats_.examples << " training examples (" << train_stats_.truncated << " truncated, "
                    << train_stats_.skipped << " skipped), " << val_stats_.examples << " held out");
    if (train_stats_.skipped) MF_WARN(r.sft_train << ": skipped " << train_stats_.skips.describe());
    if (val_stats_.skipped) MF_WARN(r.sft_val << ": skipped " << val_stats_.skips.describe());
  }
  std::string describe() const override {
    return std::to_string(train_ex_.size()) + " SFT examples, " + std::to_string(train_stats_.target_tokens) +
           " target tokens per epoch";
  }
  const std::string& tokenizer() const override { return tokenizer_; }
  BatchLoss train_batch(MixtralForCausalLM& m, int64_t first, int64_t b, const torch::Device& d) override {
    std::vector<std::vector<size_t>> rows;
    for (int64_t g = first; g < first + b; ++g) rows.push_back(row(g));
    return sft_loss(m, data::make_packed_batch(train_ex_, rows, r_.train.seq_len), d, r_.sft_aux_loss_coef.value_or(-1.0));
  }
  EvalResult evaluate(MixtralForCausalLM& m, int64_t b, int64_t max_batches, const torch::Device& d) override {
    torch::NoGradGuard ng;
    EvalModeGuard em(m);
    double sum = 0;
    EvalResult r;
    int64_t batches = 0;
    for (size_t i = 0; i < val_rows_.size() && (max_batches <= 0 || batches < max_batches); i += static_cast<size_t>(b)) {
      std::vector<std::vector<size_t>> rows(val_rows_.begin() + static_cast<long>(i),
                                            val_rows_.begin() + static_cast<long>(std::min(val_rows_.size(), i + static_cast<size_t>(b))));
      BatchLoss l = sft_loss(m, data::make_packed_batch(val_ex_, rows, r_.train.seq_len), d);
      sum += l.loss * static_cast<double>(l.tokens);
      r.tokens += l.tokens;
      ++batches;
    }
    r.loss = r.tokens ? sum / static_cast<double>(r.tokens) : 0.0;
    r.perplexity = std::exp(r.loss);
    return r;
  }
  void summarize(nlohmann::json& s) override {
    s["sft_examples"] = train_stats_.examples;
    s["sft_truncated"] = train_stats_.truncated;
    s["sft_skipped"] = train_stats_.skipped;
    s["sft_skipped_by_reason"] = train_stats_.skips.by_reason;
  }

 private:
  const std::vector<size_t>& row(int64_t g) {
    // Walk epochs until g falls inside one (rows per epoch vary a little with the order).
    while (true) {
      if (epoch_rows_.empty() || g < epoch_start_ || g >= epoch_start_ + static_cast<int64_t>(epoch_rows_.size())) {
        if (g < epoch_start_) {  // rewind (only at resume or eval): restart from epoch 0
          epoch_ = -1;
          epoch_start_ = 0;
          epoch_rows_.clear();
        }
        if (!epoch_rows_.empty()) epoch_start_ += static_cast<int64_t>(epoch_rows_.size());
        ++epoch_;
        std::vector<size_t> order(train_ex_.size());
        std::iota(order.begin(), order.end(), 0);
        std::mt19937_64 rng(r_.train.seed * 1000003ULL + static_cast<uint64_t>(epoch_));
        for (size_t k = order.size(); k > 1; --k) std::swap(order[k - 1], order[rng() % k]);
        std::vector<data::TokenizedExample> shuffled;
        for (size_t i : order) shuffled.push_back(train_ex_[i]);
        auto rows = data::pack_rows(shuffled, r_.train.seq_len);
        epoch_rows_.clear();
        for (auto& rw : rows) {
          std::vector<size_t> orig;
          for (size_t i : rw) orig.push_back(order[i]);
          epoch_rows_.push_back(orig);
        }
        continue;
      }
      return epoch_rows_[static_cast<size_t>(g - epoch_start_)];
    }
  }

  const Recipe& r_;
  std::string tokenizer_;
  std::vector<data::TokenizedExample> train_ex_, val_ex_;
  std::vector<std::vector<size_t>> val_rows_;
  data::SftStats train_stats_, val_stats_;
  int64_t epoch_ = -1, epoch_start_ = 0;
  std::vector<std::vector<size_t>> epoch_rows_;
};

// Preference pairs in a seeded order per epoch; a sample is a pair. The reference log-probs come from a
// frozen copy of init_from kept in memory, or from a table computed once into the run directory.
class DpoData : public StageData {
 public:
  explicit DpoData(const Recipe& r) : r_(r) {
    tokenizer_ = r.tokenizer.empty() ? init_tokenizer(r.init_from) : r.tokenizer;
    if (tokenizer_.empty())
      throw UserError(r.path + ": key 'tokenizer': stage dpo needs a tokenizer (set it, or init_from a checkpoint that has one)");
    data::Tokenizer tok(tokenizer_);
    if (tok.vocab_size() > r.model.vocab_size) throw UserError(tokenizer_ + ": has more pieces than the model's vocab_size");
    train_ = data::load_preference_pairs(r.sft_train, tok, r.train.seq_len, &train_stats_);
    val_ = data::load_preference_pairs(r.sft_val, tok, r.train.seq_len, &val_stats_);
    MF_INFO("dpo: " << train_.size() << " training pairs (" << train_stats_.truncated << " truncated, "
                    << train_stats_.skips.total() << " skipped), " << val_.size() << " held out; loss " << r.dpo.loss
                    << ", beta " << r.dpo.beta << ", reference " << r.dpo.reference);
    if (train_stats_.skips.total()) MF_WARN(r.sft_train << ": skipped " << train_stats_.skips.describe());
    if (val_stats_.skips.total()) MF_WARN(r.sft_val << ": skipped " << val_stats_.skips.describe());
    opt_.beta = r.dpo.beta;
    opt_.loss = r.dpo.loss;
    opt_.label_smoothing = r.dpo.label_smoothing;
    opt_.aux_loss_coef = r.dpo.aux_loss_coef.value_or(-1.0);
    opt_.rpo_alpha = r.dpo.rpo_alpha;
  }
  std::string describe() const override { return std::to_string(train_.size()) + " preference pairs"; }
  const std::string& tokenizer() const override { return tokenizer_; }

  void start(const std::string& run_dir, const torch::Device& device, bool main_rank) override {
    bf16_ = device.is_cuda() && r_.runtime.precision == "bf16";
    const std::string path = run_dir + "/reference_logps.json";
    const std::string fp = fingerprint();
    if (r_.dpo.reference == "precompute" && load_table(path, fp)) {
      MF_INFO("dpo: reference log-probs from " << path);
      return;
    }
    // Building a model draws from the global generator (module constructors); a resumed run has just
    // restored it, so put it back afterwards.
    MixtralForCausalLM ref{nullptr};
    {
      const auto rng = at::detail::getDefaultCPUGenerator().get_state();
      ref = MixtralForCausalLM(r_.model);
      auto gen = at::detail::getDefaultCPUGenerator();
      gen.set_state(rng);
    }
    load_init_weights(r_.init_from, ref);
    ref->to(device);
    ref->eval();
    for (auto& p : ref->parameters()) p.requires_grad_(false);
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
    {  // the training pairs under the precision the policy trains in (held-out evaluation runs in fp32)
      compat::CudaBf16Autocast autocast(bf16_);
      std::tie(table_[0], table_[1]) =
          reference_logps(ref, train_, all(train_.size()), r_.train.micro_batch_size, r_.train.seq_len, device);
    }
    std::tie(table_[2], table_[3]) = reference_logps(ref, val_, all(val_.size()), r_.train.micro_batch_size, r_.train.seq_len, device);
    if (!main_rank) return;  // every rank computed the same table; rank 0 keeps it
    nlohmann::json j = {{"init_from", r_.init_from}, {"fingerprint", fp}};
    const char* names[] = {"train_chosen", "train_rejected", "val_chosen", "val_rejected"};
    for (int k = 0; k < 4; ++k) {
      auto t = table_[k].to(torch::kDouble).contiguous();
      j[names[k]] = std::vector<double>(t.data_ptr<double>(), t.data_ptr<double>() + t.numel());
    }
    {
      std::ofstream out(path + ".tmp");
      out << j.dump() << "\n";
      if (!out) throw UserError(path + ".tmp: cannot write");
    }
    fsync_path(path + ".tmp");
    fs::rename(path + ".tmp", path);
  }

  BatchLoss train_batch(MixtralForCausalLM& m, int64_t first, int64_t b, const torch::Device& d) override {
    std::vector<size_t> idx;
    for (int64_t g = first; g < first + b; ++g) idx.push_back(pair_at(g));
    auto [rc, rr] = ref_logps(train_, idx, 0, d);
    return dpo_batch(m, train_, idx, rc, rr, opt_, r_.train.seq_len, d);
  }

  EvalResult evaluate(MixtralForCausalLM& m, int64_t b, int64_t max_batches, const torch::Device& d) override {
    const size_t n = max_batches > 0 ? std::min(val_.size(), static_cast<size_t>(b * max_batches)) : val_.size();
    return evaluate_pairs(m, val_, n, b, [&](const std::vector<size_t>& idx) { return ref_logps(val_, idx, 2, d); },
                          opt_, r_.train.seq_len, d);
  }

  void summarize(nlohmann::json& s) override {
    s["dpo_pairs"] = train_.size();
    s["dpo_truncated"] = train_stats_.truncated;
    s["dpo_skipped_by_reason"] = train_stats_.skips.by_reason;
    s["dpo_val_pairs"] = val_.size();
  }

 private:
  // Reference log-prob sums of pairs[idx]: from the frozen model, or the table (offset 0 train, 2 val).
  std::pair<torch::Tensor, torch::Tensor> ref_logps(const std::vector<data::PreferencePair>& pairs,
                                                    const std::vector<size_t>& idx, int table, const torch::Device& d) {
    if (!ref_.is_empty()) {
      compat::CudaBf16Autocast autocast(bf16_ && table == 0);  // as the policy: autocast in training only
      return reference_logps(ref_, pairs, idx, static_cast<int64_t>(idx.size()), r_.train.seq_len, d);
    }
    auto ix = torch::tensor(std::vector<int64_t>(idx.begin(), idx.end()), torch::kLong);
    return {table_[table].index_select(0, ix), table_[table + 1].index_select(0, ix)};
  }

  size_t pair_at(int64_t g) {
    const auto n = static_cast<int64_t>(train_.size());
    const int64_t epoch = g / n;
    if (epoch != epoch_) {
      order_.resize(train_.size());
      std::iota(order_.begin(), order_.end(), 0);
      std::mt19937_64 rng(r_.train.seed * 1000003ULL + static_cast<uint64_t>(epoch));
      for (size_t k = order_.size(); k > 1; --k) std::swap(order_[k - 1], order_[rng() % k]);
      epoch_ = epoch;
    }
    return order_[static_cast<size_t>(g % n)];
  }

  // Identifies what the table was computed from: the init checkpoint (path, and the size and time of its
  // files), the model config, the precision, seq_len, the token ids and masks.
  std::string fingerprint() const {
    uint64_t h = 1469598103934665603ULL;
    auto mix = [&](uint64_t v) { h = (h ^ v) * 1099511628211ULL; };
    auto mix_str = [&](const std::string& s) {
      mix(s.size());
      for (char c : s) mix(static_cast<uint8_t>(c));
    };
    mix_str(r_.init_from);
    mix_str(model_config_to_yaml(r_.model));
    mix_str(r_.runtime.precision);
    std::string dir = r_.init_from.rfind("hf:", 0) == 0 ? r_.init_from.substr(3) : r_.init_from;
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
  bool load_table(const std::string& path, const std::string& fp) {
    std::ifstream in(path);
    if (!in) return false;
    try {
      auto j = nlohmann::json::parse(in);
      if (j.at("fingerprint").get<std::string>() != fp) {
        MF_WARN(path << ": computed for other data or another init_from; recomputing");
        return false;
      }
      const char* names[] = {"train_chosen", "train_rejected", "val_chosen", "val_rejected"};
      for (int k = 0; k < 4; ++k) {
        auto v = j.at(names[k]).get<std::vector<double>>();
        if (v.size() != (k < 2 ? train_.size() : val_.size())) return false;
        table_[k] = torch::tensor(v, torch::kDouble).to(torch::kFloat);
      }
      return true;
    } catch (const std::exception&) {
      MF_WARN(path << ": unreadable; recomputing");
      return false;
    }
  }

  const Recipe& r_;
  std::string tokenizer_;
  std::vector<data::PreferencePair> train_, val_;
  data::PreferenceStats train_stats_, val_stats_;
  DpoOptions opt_;
  MixtralForCausalLM ref_{nullptr};
  bool bf16_ = false;
  torch::Tensor table_[4];
  int64_t epoch_ = -1;
  std::vector<size_t> order_;
};

}  // namespace

std::unique_ptr<StageData> make_stage_data(const Recipe& r) {
  if (r.stage == "sft") return std::make_unique<SftData>(r);
  if (r.stage == "dpo") return std::make_unique<DpoData>(r);
  return std::make_unique<PretrainData>(r);
}

}  // namespace moeforge::train
