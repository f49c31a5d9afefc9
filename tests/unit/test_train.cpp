#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>

#include "core/error.h"
#include "data/lm_dataset.h"
#include "model/decoder.h"
#include "test_util.h"
#include "objective/lm_objective.h"
#include "model/param_count.h"
#include "parallel/grad_sync.h"
#include "optim/optimizer.h"
#include "io/key_table.h"
#include "recipe/recipe.h"
#include "recipe/recipe_keys.h"
#include "optim/schedule.h"
#include "train/trainer.h"

using namespace moeforge;
using namespace moeforge::train;

TEST(Schedule, WarmupThenCosineAtChosenSteps) {
  const int64_t total = 110, warm = 10;
  const double lr = 1.0, lo = 0.1;
  EXPECT_DOUBLE_EQ(lr_at(0, total, warm, lr, lo, "cosine", 0), 0.1);   // (0 + 1) / 10
  EXPECT_DOUBLE_EQ(lr_at(4, total, warm, lr, lo, "cosine", 0), 0.5);
  EXPECT_DOUBLE_EQ(lr_at(9, total, warm, lr, lo, "cosine", 0), 1.0);
  EXPECT_DOUBLE_EQ(lr_at(10, total, warm, lr, lo, "cosine", 0), 1.0);  // cosine starts at the peak
  // Half-way through the decay (p = 49.5 / 99 = 0.5): min + (max - min) / 2.
  EXPECT_NEAR(lr_at(10 + 49, total, warm, lr, lo, "cosine", 0),
              lo + (lr - lo) * 0.5 * (1 + std::cos(M_PI * 49.0 / 99.0)), 1e-15);
  EXPECT_NEAR(lr_at(109, total, warm, lr, lo, "cosine", 0), lo, 1e-15);  // ends at min_lr
  EXPECT_DOUBLE_EQ(lr_at(50, total, warm, lr, lo, "constant", 0), lr);
  // WSD with decay_fraction 0.2: stable to step 87, then linear to min_lr at step 109.
  EXPECT_DOUBLE_EQ(lr_at(87, total, warm, lr, lo, "wsd", 0.2), lr);
  EXPECT_NEAR(lr_at(88, total, warm, lr, lo, "wsd", 0.2), lr + (lo - lr) * (1.0 / 22.0), 1e-15);
  EXPECT_NEAR(lr_at(109, total, warm, lr, lo, "wsd", 0.2), lo, 1e-15);
}

TEST(AdamW, OneStepByHandAndNoDecayOnNorms) {
  auto w = torch::tensor({{1.0f, -2.0f}}).requires_grad_(true);  // 2-D: decays
  auto n = torch::tensor({3.0f}).requires_grad_(true);           // 1-D norm: no decay
  AdamW opt({{"layer.weight", w}, {"layer.input_layernorm.weight", n}}, AdamWOptions{0.9, 0.99, 1e-8, 0.1});
  w.mutable_grad() = torch::tensor({{0.5f, -1.0f}});
  n.mutable_grad() = torch::tensor({2.0f});
  opt.step(0.01);
  // Step 1: m = 0.1 g, v = 0.01 g^2, m_hat = g, v_hat = g^2 -> update = lr * g / (|g| + eps) = lr * sign(g).
  const double wd = 1.0 - 0.01 * 0.1;
  EXPECT_NEAR(w[0][0].item<double>(), 1.0 * wd - 0.01, 1e-6);
  EXPECT_NEAR(w[0][1].item<double>(), -2.0 * wd + 0.01, 1e-6);
  EXPECT_NEAR(n[0].item<double>(), 3.0 - 0.01, 1e-6);
  EXPECT_TRUE(decays("model.layers.0.self_attn.q_proj.weight", torch::zeros({2, 2})));
  EXPECT_FALSE(decays("model.norm.weight", torch::zeros({2})));
  // State round trip.
  auto st = opt.state();
  AdamW other({{"layer.weight", w.detach().clone()}, {"layer.input_layernorm.weight", n.detach().clone()}},
              AdamWOptions{0.9, 0.99, 1e-8, 0.1});
  std::map<std::string, torch::Tensor> m(st.begin(), st.end());
  other.load_state(m, "test");
  auto st2 = other.state();
  for (size_t i = 0; i < st.size(); ++i) EXPECT_TRUE(torch::equal(st[i].second, st2[i].second)) << st[i].first;
  m.erase("exp_avg.layer.weight");
  EXPECT_THROW(other.load_state(m, "test"), UserError);
}

TEST(ClipGradNorm, ScalesToMaxNorm) {
  auto a = torch::zeros({2}).requires_grad_(true), b = torch::zeros({1}).requires_grad_(true);
  a.mutable_grad() = torch::tensor({3.0f, 0.0f});
  b.mutable_grad() = torch::tensor({4.0f});
  EXPECT_NEAR(parallel::clip_grad_norm({a, b}, 1.0), 5.0, 1e-6);
  EXPECT_NEAR(std::sqrt(a.grad().pow(2).sum().item<double>() + b.grad().pow(2).sum().item<double>()), 1.0, 1e-5);
}

// Four micro-batches of 2 rows accumulated equal one batch of 8 rows: cross-entropy and z-loss are
// token means, so their gradients average exactly. (The aux loss is per micro-batch by design.)
TEST(GradAccumulation, FourMicroBatchesEqualOneLargeBatch) {
  ModelConfig c = test::tiny_config();
  c.moe.aux_loss_coef = 0.0;
  c.moe.z_loss_coef = 0.01;
  MixtralForCausalLM a(c), b(c);
  init_weights(*a, c.init_std, 5);
  init_weights(*b, c.init_std, 5);
  torch::manual_seed(0);
  auto ids = torch::randint(0, c.vocab_size, {8, 17}, torch::kLong);
  data::LmBatch big{ids.narrow(1, 0, 16).contiguous(), ids.narrow(1, 1, 16).contiguous()};
  lm_loss(a, big, torch::kCPU).total.backward();
  for (int i = 0; i < 4; ++i) {
    data::LmBatch micro{big.inputs.narrow(0, 2 * i, 2), big.targets.narrow(0, 2 * i, 2)};
    (lm_loss(b, micro, torch::kCPU).total / 4.0).backward();
  }
  auto pa = a->named_parameters(), pb = b->named_parameters();
  for (auto& p : pa) {
    auto ga = p.value().grad(), gb = pb[p.key()].grad();
    ASSERT_EQ(ga.defined(), gb.defined()) << p.key();
    if (!ga.defined()) continue;
    const double scale = std::max(1e-3, ga.abs().max().item<double>());
    EXPECT_LT(test::max_abs_diff(ga, gb) / scale, 1e-5) << p.key();
  }
}

TEST(Recipe, ErrorsNameFileAndKey) {
  auto cfg = test::source_path("configs/tiny.yaml");
  auto write = [&](const std::string& body) {
    return test::write_temp("recipe.yaml", "model: " + cfg + "\ndata:\n  dir: /tmp/x\n" + body);
  };
  auto msg = [&](const std::string& body) -> std::string {
    try {
      load_recipe(write(body), {});
    } catch (const UserError& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_EQ(msg("train:\n  seq_len: 64\n"), "");
  EXPECT_NE(msg("train:\n  seq_lenn: 64\n").find("did you mean 'seq_len'"), std::string::npos);
  EXPECT_NE(msg("train:\n  seq_len: 100000\n").find("max_position_embeddings"), std::string::npos);
  EXPECT_NE(msg("optim:\n  betas: [0.9]\n").find("optim.betas"), std::string::npos);
  EXPECT_NE(msg("optim:\n  schedule: cosin\n").find("did you mean 'cosine'"), std::string::npos);
  EXPECT_NE(msg("stage: pretrian\n").find("key 'stage'"), std::string::npos);
  // Layouts: EP must divide the experts (tiny: 8); ZeRO is 0 or 1.
  EXPECT_EQ(msg("parallel: {expert: 4, zero: 1}\n"), "");
  EXPECT_NE(msg("parallel: {expert: 3}\n").find("parallel.expert"), std::string::npos);
  EXPECT_NE(msg("parallel: {expert: 3}\n").find("does not divide model.moe.num_experts (8)"), std::string::npos);
  EXPECT_NE(msg("parallel: {expert: 0}\n").find("parallel.expert"), std::string::npos);
  EXPECT_NE(msg("parallel: {zero: 2}\n").find("parallel.zero"), std::string::npos);
  // The two documented overrides.
  Recipe r = load_recipe(write(""), {"output_dir=/tmp/elsewhere", "train.max_steps=7", "model.moe.num_experts=4"});
  EXPECT_EQ(r.output_dir, "/tmp/elsewhere");
  EXPECT_EQ(r.train.max_steps, 7);
  EXPECT_EQ(r.model.moe.num_experts, 4);
  EXPECT_EQ(r.model.hidden_size, 128);  // the rest of configs/tiny.yaml is kept, not replaced by defaults
  EXPECT_EQ(r.model.num_layers, 4);
  // The resolved recipe parses back to the same thing.
  auto again = load_recipe(test::write_temp("resolved.yaml", r.yaml), {});
  EXPECT_EQ(again.yaml, r.yaml);
}

TEST(Flops, TrainingFlopsPerTokenByHand) {
  ModelConfig c = test::tiny_config();
  ParamCounts p = count_params(c);
  const double expect = 6.0 * static_cast<double>(p.active - p.embedding) + 12.0 * c.num_layers * 64 * c.q_dim();
  EXPECT_DOUBLE_EQ(training_flops_per_token(c, 64), expect);
}

// No silent no-ops (issue 31): a key set to other than its default where it cannot take effect is refused, naming
// the key and what disables it; from a shared model config file it is one warning; resolved recipes pass.
TEST(NoOpKeys, RefusedWithTheKeyThatDisablesThem) {
  auto tiny = test::source_path("configs/tiny.yaml");  // moe.balance: aux_free_bias
  auto msg = [&](const std::string& body, const std::vector<std::string>& sets = {}) -> std::string {
    try {
      Recipe r = load_recipe(test::write_temp("noop.yaml", body), sets);
      refuse_no_op_keys(r, sets);
    } catch (const UserError& e) {
      return e.what();
    }
    return "";
  };
  const std::string pre = "model: " + tiny + "\ndata:\n  dir: /tmp/x\n";
  const std::string sft = "stage: sft\nmodel: " + tiny + "\ndata: {train: /tmp/a.jsonl, val: /tmp/b.jsonl}\n";
  auto has = [](const std::string& m, const std::string& a, const std::string& b) {
    return m.find(a) != std::string::npos && m.find(b) != std::string::npos;
  };
  EXPECT_EQ(msg(pre), "");
  EXPECT_TRUE(has(msg(pre + "finetune: {lora: {rank: 4}}\n"), "key 'finetune.lora.rank'", "finetune.method is full"));
  EXPECT_TRUE(has(msg(pre + "init_from: /tmp/base\nfinetune: {method: lora, quant: {block_size: 32}}\n"),
                  "key 'finetune.quant.block_size'", "finetune.method is lora"));
  EXPECT_EQ(msg(pre + "init_from: /tmp/base\nfinetune: {method: qlora, quant: {block_size: 32}}\n"), "");
  EXPECT_TRUE(has(msg(pre + "sft: {train_on_all: true}\n"), "key 'sft.train_on_all'", "stage is pretrain"));
  EXPECT_TRUE(has(msg(sft + "dpo: {beta: 0.5}\n"), "key 'dpo.beta'", "stage is sft"));
  // The aux-loss coefficient under aux-loss-free balancing (the quickstart model): the sft-arith case.
  EXPECT_TRUE(has(msg(sft + "sft: {aux_loss_coef: 0.01}\n"), "key 'sft.aux_loss_coef'", "model.moe.balance is aux_free_bias"));
  EXPECT_EQ(msg(sft + "sft: {aux_loss_coef: 0.01}\n", {"model.moe.balance=aux_loss"}), "");
  // Model keys: from the shared config file a warning (tiny.yaml's bias_update_rate under aux_loss), from --set
  // an error.
  EXPECT_EQ(msg(pre, {"model.moe.balance=aux_loss"}), "");
  EXPECT_TRUE(has(msg(pre, {"model.moe.aux_loss_coef=0.05"}), "key 'model.moe.aux_loss_coef'", "aux_free_bias"));
  EXPECT_TRUE(has(msg(pre, {"model.moe.balance=none", "model.moe.bias_update_rate=0.02"}),
                  "key 'model.moe.bias_update_rate'", "model.moe.balance is none"));
  // A resolved recipe (every key written out, unused sections at their defaults) reads back clean.
  Recipe r = load_recipe(test::write_temp("noop.yaml", sft), {});
  EXPECT_NO_THROW(refuse_no_op_keys(load_recipe(test::write_temp("resolved.yaml", r.yaml), {}), {}));
}

// Shortest round-trip numbers in the key reference (docs/keys.md, info --keys): 0.1, not 0.10000000000000001.
TEST(NoOpKeys, ReferenceNumbersAreShortest) {
  const std::string md = key_reference_markdown();
  EXPECT_NE(md.find("| `optim.weight_decay` | float | `0.1` |"), std::string::npos);
  EXPECT_NE(md.find("`[0.9, 0.95]`"), std::string::npos);
  EXPECT_EQ(md.find("0000000"), std::string::npos);
  EXPECT_EQ(io::shortest_numbers("[0.90000000000000002, 1e-08, 3]"), "[0.9, 1e-08, 3]");
}
