// The commands that make and move whole models without holding them (issue 15): `moeforge init` written one
// expert share at a time equals the one-process initialisation bit for bit and loads into any layout;
// `export --format hf` (streamed, shard by shard) and `import` (streamed, share by share) round-trip it exactly
// in fp32, through the per-expert and the fused layout; a training run started from the seed starts from the
// same weights `init` writes.
#include <gtest/gtest.h>

#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <map>

#include "corpus.h"
#include "io/model_config_yaml.h"
#include "io/safetensors.h"
#include "model/decoder.h"
#include "run_util.h"
#include "test_util.h"
#include "train/checkpoint.h"
#include "train/manifest.h"

using namespace moeforge;
namespace fs = std::filesystem;

namespace {
const std::string kBin = MOEFORGE_BINARY;

void expect_same_weights(MixtralForCausalLM& a, MixtralForCausalLM& b, const std::string& what) {
  auto pb = b->named_parameters();
  ASSERT_EQ(a->named_parameters().size(), pb.size()) << what;
  for (auto& p : a->named_parameters()) {
    ASSERT_TRUE(pb.contains(p.key())) << what << ": " << p.key();
    EXPECT_TRUE(torch::equal(p.value(), pb[p.key()])) << what << ": " << p.key();
  }
}
}  // namespace

TEST(InitImportExport, InitBySharesEqualsOneProcessAndRoundTrips) {
  test::TempDir dir("initcmd");
  const std::string cfg_path = dir / "model.yaml";
  {
    // small_model_yaml is a recipe's `model:` mapping: the same keys, unindented, as a config file.
    std::string y = test::small_model_yaml("init-test");
    std::string out;
    std::istringstream in(y);
    for (std::string line; std::getline(in, line);) {
      if (line == "model:") continue;
      out += (line.rfind("  ", 0) == 0 ? line.substr(2) : line) + "\n";
    }
    std::ofstream(cfg_path) << out;
  }
  const ModelConfig cfg = io::load_model_config(cfg_path);
  ASSERT_EQ(cfg.moe.num_experts, 4);
  MixtralForCausalLM expected(cfg);
  init_weights(*expected, cfg.init_std, 7);

  for (int shares : {1, 2, 4}) {
    const std::string ck = dir / ("init" + std::to_string(shares));
    ASSERT_EQ(test::run_quiet(kBin + " init " + cfg_path + " --out " + ck + " --seed 7 --shards " + std::to_string(shares)), 0);
    EXPECT_TRUE(train::verify_checkpoint(ck).ok && !train::verify_checkpoint(ck).legacy) << shares;
    EXPECT_EQ(fs::exists(ck + "/layout.json"), shares > 1);
    auto m = train::load_checkpoint_model(ck);
    expect_same_weights(m, expected, "init --shards " + std::to_string(shares));
  }
  // Refusals: shares that do not divide the experts, an existing output.
  EXPECT_EQ(test::run_quiet(kBin + " init " + cfg_path + " --out " + (dir / "bad") + " --shards 3"), 2);
  EXPECT_FALSE(fs::exists(dir / "bad"));
  EXPECT_EQ(test::run_quiet(kBin + " init " + cfg_path + " --out " + (dir / "init2")), 2);

  // Streamed export of the 4-share checkpoint (fp32, tiny shards: one tensor or so each), then import.
  const std::string hf = dir / "hf", back = dir / "back";
  ASSERT_EQ(test::run_quiet(kBin + " export " + (dir / "init4") + " --format hf --dtype fp32 --max-shard-size 20KB --out " + hf), 0);
  ASSERT_TRUE(fs::exists(hf + "/model.safetensors.index.json"));
  ASSERT_EQ(test::run_quiet(kBin + " import " + hf + " --out " + back), 0);
  auto m = train::load_checkpoint_model(back);
  expect_same_weights(m, expected, "init -> export -> import");
  // --dtype bf16 stores bf16 (half the bytes) and loads as the weights rounded to bf16.
  ASSERT_EQ(test::run_quiet(kBin + " import " + hf + " --dtype bf16 --out " + back + "16"), 0);
  EXPECT_EQ(io::SafetensorsFile::open(back + "16/model.safetensors").entry("model.embed_tokens.weight").dtype, "BF16");
  auto m16 = train::load_checkpoint_model(back + "16");
  MixtralForCausalLM rounded(cfg);
  {
    torch::NoGradGuard ng;
    auto pe = expected->named_parameters();
    for (auto& p : rounded->named_parameters()) p.value().copy_(pe[p.key()].to(torch::kBFloat16).to(torch::kFloat));
  }
  expect_same_weights(m16, rounded, "import --dtype bf16");
  EXPECT_EQ(test::run_quiet(kBin + " import " + hf + " --dtype fp16 --out " + back + "-bad"), 2);

  // A fresh pretraining run (no init_from) starts from the same weights: its step-0 loss equals the loss of
  // a run started from the init checkpoint (same seed, same data, same order).
  const std::string data = test::make_prepared(dir, 60);
  const std::string recipe = dir / "r.yaml";
  std::ofstream(recipe) << "stage: pretrain\n" << test::small_model_yaml("init-test") << "data: {dir: " << data << "}\n"
                        << "train: {micro_batch_size: 2, seq_len: 32, max_steps: 1, eval_interval: 100, eval_batches: 1,"
                           " seed: 7}\nruntime: {threads: 1}\n";
  ASSERT_EQ(test::run_quiet(kBin + " train " + recipe + " --set output_dir=" + (dir / "fresh")), 0);
  ASSERT_EQ(test::run_quiet(kBin + " train " + recipe + " --set output_dir=" + (dir / "from_init") +
                            " --set init_from=" + (dir / "init2")), 0);
  auto a = test::metric_records(dir / "fresh", "loss"), b = test::metric_records(dir / "from_init", "loss");
  ASSERT_EQ(a.size(), 1u);
  ASSERT_EQ(b.size(), 1u);
  EXPECT_EQ(a[0]["loss"], b[0]["loss"]);
}
