// Pretraining: next-token prediction over windows of the prepared token shards.
#include <torch/torch.h>

#include <filesystem>

#include "core/error.h"
#include "data/lm_dataset.h"
#include "objective/lm_objective.h"
#include "train/stage.h"
#include "train/trainer.h"

namespace moeforge::train {

namespace fs = std::filesystem;

namespace {

// Test hook: MOEFORGE_DUMP_BATCHES=FILE appends every training micro-batch (inputs then targets, int64, [b, T]
// each) to FILE, for an independent trainer to read the same batches (tests/python/lora_reference.py).
void dump_batch_for_test(const torch::Tensor& inputs, const torch::Tensor& targets) {
  const std::string path = test_dump_path();
  if (path.empty()) return;
  // One append per micro-batch: inputs then targets, flattened, in one buffer.
  const auto c = torch::cat({inputs.reshape({-1}), targets.reshape({-1})}).to(torch::kCPU, torch::kLong).contiguous();
  append_to_test_dump(path, c.data_ptr<int64_t>(), sizeof(int64_t) * static_cast<size_t>(c.numel()));
}

class PretrainStage : public Stage {
 public:
  explicit PretrainStage(const Recipe& r) : Stage(r, r.model.moe.aux_loss_coef) {
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
  bool evaluates_at_start() const override { return false; }  // a fresh model's loss is ln(vocab)
  BatchLoss train_batch(MixtralForCausalLM& m, int64_t first, int64_t b, const torch::Device& d) override {
    auto batch = train_->batch(first, b);
    dump_batch_for_test(batch.inputs, batch.targets);
    return lm_loss(m, batch, d, aux_loss_coef_);
  }
  EvalResult evaluate(MixtralForCausalLM& m, int64_t b, int64_t max_batches, const torch::Device& d) override {
    return evaluate_lm(m, *val_, b, max_batches, d);
  }
  void summarize(nlohmann::json& s) override { s["unigram_entropy"] = unigram_entropy(recipe_.data_dir, "val"); }

 private:
  std::string tokenizer_;
  std::unique_ptr<data::LmSampler> train_, val_;
};

}  // namespace

std::unique_ptr<Stage> make_pretrain_stage(const Recipe& r) { return std::make_unique<PretrainStage>(r); }

}  // namespace moeforge::train
