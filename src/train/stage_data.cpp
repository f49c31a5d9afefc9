#include "train/stage_data.h"

#include <torch/torch.h>

#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>

#include "core/error.h"
#include "core/log.h"
#include "data/lm_dataset.h"
#include "data/sft_dataset.h"
#include "train/checkpoint.h"
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
    LmLoss l = lm_loss(m, train_->batch(first, b), d);
    BatchLoss o;
    o.total = l.total;
    o.loss = l.ce;
    o.aux = l.aux;
    o.z = l.z;
    o.tokens = l.tokens;
    o.load_per_layer = l.load_per_layer;
    o.entropy_per_layer = l.entropy_per_layer;
    return o;
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
  }
  std::string describe() const override {
    return std::to_string(train_ex_.size()) + " SFT examples, " + std::to_string(train_stats_.target_tokens) +
           " target tokens per epoch";
  }
  const std::string& tokenizer() const override { return tokenizer_; }
  BatchLoss train_batch(MixtralForCausalLM& m, int64_t first, int64_t b, const torch::Device& d) override {
    std::vector<std::vector<size_t>> rows;
    for (int64_t g = first; g < first + b; ++g) rows.push_back(row(g));
    SftLoss l = sft_loss(m, data::make_packed_batch(train_ex_, rows, r_.train.seq_len), d);
    BatchLoss o;
    o.total = l.total;
    o.loss = l.loss;
    o.aux = l.aux;
    o.z = l.z;
    o.accuracy = l.accuracy;
    o.tokens = l.target_tokens;
    o.load_per_layer = l.load_per_layer;
    o.entropy_per_layer = l.entropy_per_layer;
    return o;
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
      SftLoss l = sft_loss(m, data::make_packed_batch(val_ex_, rows, r_.train.seq_len), d);
      sum += l.loss * static_cast<double>(l.target_tokens);
      r.tokens += l.target_tokens;
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

}  // namespace

std::unique_ptr<StageData> make_stage_data(const Recipe& r) {
  if (r.stage == "sft") return std::make_unique<SftData>(r);
  return std::make_unique<PretrainData>(r);
}

}  // namespace moeforge::train
