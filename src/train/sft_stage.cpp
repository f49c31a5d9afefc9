// Supervised fine-tuning: examples shuffled per epoch (seeded), then packed first-fit into rows of seq_len
// predictions; a sample is a row, so resuming needs only the global row index.
#include <torch/torch.h>

#include <cmath>

#include "core/error.h"
#include "core/log.h"
#include "data/epoch_order.h"
#include "data/sft_dataset.h"
#include "data/tokenizer.h"
#include "checkpoint/checkpoint.h"
#include "objective/sft_objective.h"
#include "train/stage.h"

namespace moeforge::train {

namespace {

class SftStage : public Stage {
 public:
  explicit SftStage(const Recipe& r) : Stage(r, r.sft_aux_loss_coef.value_or(r.model.moe.aux_loss_coef)) {
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
    BatchLoss l = sft_loss(m, data::make_packed_batch(train_ex_, rows, recipe_.train.seq_len), d, aux_loss_coef_);
    l.metrics["token_accuracy"] = l.accuracy;
    return l;
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
      BatchLoss l = sft_loss(m, data::make_packed_batch(val_ex_, rows, recipe_.train.seq_len), d);
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
        const auto order = data::epoch_order(train_ex_.size(), recipe_.train.seed, epoch_);
        std::vector<data::TokenizedExample> shuffled;
        for (size_t i : order) shuffled.push_back(train_ex_[i]);
        auto rows = data::pack_rows(shuffled, recipe_.train.seq_len);
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

  std::string tokenizer_;
  std::vector<data::TokenizedExample> train_ex_, val_ex_;
  std::vector<std::vector<size_t>> val_rows_;
  data::SftStats train_stats_, val_stats_;
  int64_t epoch_ = -1, epoch_start_ = 0;
  std::vector<std::vector<size_t>> epoch_rows_;
};

}  // namespace

std::unique_ptr<Stage> make_sft_stage(const Recipe& r) { return std::make_unique<SftStage>(r); }

}  // namespace moeforge::train
