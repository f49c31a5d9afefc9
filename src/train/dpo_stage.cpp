// Preference tuning (DPO): pairs in a seeded order per epoch, a sample is a pair; the reference log-probs
// come from objective/dpo_reference.
#include <torch/torch.h>

#include <memory>

#include "core/error.h"
#include "core/log.h"
#include "data/epoch_order.h"
#include "data/preference.h"
#include "data/tokenizer.h"
#include "checkpoint/checkpoint.h"
#include "objective/dpo_objective.h"
#include "objective/dpo_reference.h"
#include "train/stage.h"

namespace moeforge::train {

namespace {

// Test hook: MOEFORGE_DUMP_BATCHES=FILE appends one JSON line per training micro-batch, its pairs in order, each
// side's token ids and loss mask ({"pairs": [{"chosen": {"ids", "mask"}, "rejected": {...}}, ...]}), for an
// independent trainer to read the same pairs (tests/python/lora_reference.py).
void dump_pairs_for_test(const std::vector<data::PreferencePair>& pairs, const std::vector<size_t>& idx) {
  const std::string path = test_dump_path();
  if (path.empty()) return;
  nlohmann::json line = {{"pairs", nlohmann::json::array()}};
  for (size_t i : idx) {
    auto side = [](const data::TokenizedExample& e) { return nlohmann::json{{"ids", e.ids}, {"mask", e.loss_mask}}; };
    line["pairs"].push_back({{"chosen", side(pairs[i].chosen)}, {"rejected", side(pairs[i].rejected)}});
  }
  const std::string text = line.dump() + "\n";
  append_to_test_dump(path, text.data(), text.size());
}

class DpoStage : public Stage {
 public:
  explicit DpoStage(const Recipe& r) : Stage(r, r.dpo.aux_loss_coef.value_or(r.model.moe.aux_loss_coef)) {
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
    opt_.aux_loss_coef = aux_loss_coef_;
    opt_.rpo_alpha = r.dpo.rpo_alpha;
    reference_ = std::make_unique<DpoReference>(r, train_, val_);
  }
  std::string describe() const override { return std::to_string(train_.size()) + " preference pairs"; }
  const std::string& tokenizer() const override { return tokenizer_; }

  void start(const std::string& run_dir, const torch::Device& device, bool main_rank, MixtralForCausalLM& model,
             const GroupXor& experts_xor) override {
    reference_->start(run_dir, device, main_rank, model, experts_xor);
  }

  BatchLoss train_batch(MixtralForCausalLM& m, int64_t first, int64_t b, const torch::Device& d) override {
    std::vector<size_t> idx;
    for (int64_t g = first; g < first + b; ++g) idx.push_back(pair_at(g));
    dump_pairs_for_test(train_, idx);
    auto [rc, rr] = reference_->logps(true, idx, d, m);
    return dpo_batch(m, train_, idx, rc, rr, opt_, recipe_.train.seq_len, d);
  }

  EvalResult evaluate(MixtralForCausalLM& m, int64_t b, int64_t max_batches, const torch::Device& d) override {
    const size_t n = max_batches > 0 ? std::min(val_.size(), static_cast<size_t>(b * max_batches)) : val_.size();
    return evaluate_pairs(m, val_, n, b, [&](const std::vector<size_t>& idx) { return reference_->logps(false, idx, d, m); },
                          opt_, recipe_.train.seq_len, d);
  }

  // DPO's objective adds rpo_alpha x the chosen completions' NLL (TRL's rpo_alpha).
  double total_loss(double loss, double aux, double z, const std::map<std::string, double>& metrics) const override {
    const auto nll = metrics.find("nll_loss");
    return Stage::total_loss(loss, aux, z, metrics) + (nll != metrics.end() ? opt_.rpo_alpha * nll->second : 0.0);
  }

  void summarize(nlohmann::json& s) override {
    s["dpo_pairs"] = train_.size();
    s["dpo_truncated"] = train_stats_.truncated;
    s["dpo_skipped_by_reason"] = train_stats_.skips.by_reason;
    s["dpo_val_pairs"] = val_.size();
  }

 private:
  size_t pair_at(int64_t g) {
    const auto n = static_cast<int64_t>(train_.size());
    const int64_t epoch = g / n;
    if (epoch != epoch_) {
      order_ = data::epoch_order(train_.size(), recipe_.train.seed, epoch);
      epoch_ = epoch;
    }
    return order_[static_cast<size_t>(g % n)];
  }

  std::string tokenizer_;
  std::vector<data::PreferencePair> train_, val_;
  data::PreferenceStats train_stats_, val_stats_;
  DpoOptions opt_;
  std::unique_ptr<DpoReference> reference_;
  int64_t epoch_ = -1;
  std::vector<size_t> order_;
};

}  // namespace

std::unique_ptr<Stage> make_dpo_stage(const Recipe& r) { return std::make_unique<DpoStage>(r); }

}  // namespace moeforge::train
