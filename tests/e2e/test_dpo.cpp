// End to end: pretrain a little, then `stage: dpo` twice from that checkpoint, with the reference model
// in memory and with precomputed reference log-probs; then `eval --preferences` on the result.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "corpus.h"
#include "run_util.h"
#include "checkpoint/checkpoint.h"

using namespace moeforge;
namespace fs = std::filesystem;

namespace {
const std::string kDpoModelYaml = test::small_model_yaml("dpo-e2e", ", router_jitter: 0.1");
using test::metric_records;
using test::run_quiet;

// Chosen: the object that belongs to the subject; rejected: another one.
void write_dpo_pairs(const std::string& path, int n, int offset) {
  static const char* subj[] = {"the cat", "a dog", "the old man", "my sister", "the river", "a small bird"};
  static const char* obj[] = {"the moon.", "a red apple.", "the long road.", "the quiet town.", "a green boat.",
                              "the winter sky."};
  std::ofstream out(path);
  for (int i = 0; i < n; ++i) {
    const int k = (i + offset) % 6, w = (i + offset + 1 + i % 4) % 6;
    out << nlohmann::json{{"prompt", std::string(subj[k]) + " sees"}, {"chosen", obj[k]}, {"rejected", obj[w]}}.dump()
        << "\n";
  }
}


}  // namespace

TEST(Dpo, PrecomputedAndInMemoryReferenceGiveTheSameLosses) {
  test::TempDir dir("dpoe2e");
  std::string data = test::make_prepared(dir, 80);
  std::ofstream(dir / "pre.yaml") << "stage: pretrain\n" << kDpoModelYaml << "data: {dir: " << data << "}\n"
                                  << "train: {micro_batch_size: 4, seq_len: 32, max_steps: 10, eval_batches: 2}\n"
                                  << "runtime: {threads: 1}\noutput_dir: " << (dir / "pre") << "\n";
  ASSERT_EQ(run_quiet(std::string(MOEFORGE_BINARY) + " train " + (dir / "pre.yaml")), 0);
  const auto pre = *train::latest_checkpoint(dir / "pre");
  write_dpo_pairs(dir / "train.jsonl", 48, 0);
  write_dpo_pairs(dir / "val.jsonl", 12, 3);
  auto recipe = [&](const std::string& name, const std::string& reference) {
    std::ofstream(dir / (name + ".yaml"))
        << "stage: dpo\ninit_from: " << pre << "\ndata: {train: " << (dir / "train.jsonl") << ", val: "
        << (dir / "val.jsonl") << "}\n"
        << "dpo: {beta: 0.5, loss: sigmoid, reference: " << reference << "}\n"
        << "train: {micro_batch_size: 6, seq_len: 48, max_steps: 8, log_interval: 1, eval_interval: 8, "
           "eval_batches: 2, checkpoint_interval: 8}\n"
        << "optim: {lr: 3.0e-3, min_lr: 3.0e-4, warmup_steps: 0, schedule: constant}\n"
        << "runtime: {threads: 1}\noutput_dir: " << (dir / name) << "\n";
    return std::string(MOEFORGE_BINARY) + " train " + (dir / (name + ".yaml"));
  };
  ASSERT_EQ(run_quiet(recipe("frozen", "frozen")), 0);
  ASSERT_EQ(run_quiet(recipe("precompute", "precompute")), 0);
  EXPECT_TRUE(fs::exists(dir / "precompute/reference_logps.json"));
  EXPECT_FALSE(fs::exists(dir / "frozen/reference_logps.json"));

  auto a = metric_records(dir / "frozen", "rewards/accuracies"), b = metric_records(dir / "precompute", "rewards/accuracies");
  ASSERT_EQ(a.size(), 8u);
  ASSERT_EQ(b.size(), 8u);
  // The first step's policy is the reference; with router jitter (training mode only) it is near log 2.
  EXPECT_NEAR(a[0]["loss"].get<double>(), std::log(2.0), 0.05);
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_NEAR(a[i]["loss"].get<double>(), b[i]["loss"].get<double>(), 1e-5) << "step " << i + 1;
    EXPECT_NEAR(a[i]["rewards/margins"].get<double>(), b[i]["rewards/margins"].get<double>(), 1e-5) << "step " << i + 1;
  }
  EXPECT_LT(a.back()["loss"].get<double>(), a[0]["loss"].get<double>());
  // Killed after the step-4 checkpoint and resumed: the reference table is reused and the losses continue
  // bit for bit (router jitter draws from the restored generator: building a reference must not disturb it).
  const std::string resumed_cmd = recipe("resumed", "precompute") + " --set train.checkpoint_interval=4";
  EXPECT_NE(run_quiet("MOEFORGE_TEST_KILL_AFTER_CHECKPOINT=4 " + resumed_cmd), 0);
  ASSERT_TRUE(fs::exists(dir / "resumed/reference_logps.json"));
  const auto table_time = fs::last_write_time(dir / "resumed/reference_logps.json");
  ASSERT_EQ(run_quiet(resumed_cmd + " --resume"), 0);
  EXPECT_EQ(fs::last_write_time(dir / "resumed/reference_logps.json"), table_time);
  auto c = metric_records(dir / "resumed", "rewards/accuracies");
  ASSERT_EQ(c.size(), 8u);
  for (size_t i = 0; i < c.size(); ++i) EXPECT_EQ(c[i]["loss"].get<double>(), b[i]["loss"].get<double>()) << i + 1;
  // The same with the reference in memory (rebuilt from init_from at the restart).
  const std::string frozen_cmd = recipe("resumed_frozen", "frozen") + " --set train.checkpoint_interval=4";
  EXPECT_NE(run_quiet("MOEFORGE_TEST_KILL_AFTER_CHECKPOINT=4 " + frozen_cmd), 0);
  ASSERT_EQ(run_quiet(frozen_cmd + " --resume"), 0);
  auto f = metric_records(dir / "resumed_frozen", "rewards/accuracies");
  ASSERT_EQ(f.size(), 8u);
  for (size_t i = 0; i < f.size(); ++i) EXPECT_EQ(f[i]["loss"].get<double>(), a[i]["loss"].get<double>()) << i + 1;

  // Held-out: recorded before training (rewards 0) and after.
  auto va = metric_records(dir / "frozen", "val_rewards/accuracies"), vb = metric_records(dir / "precompute", "val_rewards/accuracies");
  ASSERT_EQ(va.size(), 2u);
  ASSERT_EQ(vb.size(), 2u);
  EXPECT_EQ(va[0]["step"], 0);
  EXPECT_NEAR(va[0]["val_loss"].get<double>(), std::log(2.0), 1e-6);  // eval mode: no jitter, policy == reference
  EXPECT_NEAR(va[0]["val_rewards/margins"].get<double>(), 0.0, 1e-6);
  EXPECT_NEAR(vb[0]["val_loss"].get<double>(), std::log(2.0), 1e-6);
  EXPECT_NEAR(va[1]["val_loss"].get<double>(), vb[1]["val_loss"].get<double>(), 1e-5);
  for (const char* k : {"val_rewards/chosen", "val_rewards/rejected", "val_rewards/margins", "val_logps/chosen",
                        "val_logps/rejected"})
    EXPECT_TRUE(va[1].contains(k)) << k;

  // eval --preferences: the tuned checkpoint against its reference, the same numbers as the run's last eval.
  const auto tuned = *train::latest_checkpoint(dir / "frozen");
  const std::string out = dir / "prefs.json";
  ASSERT_EQ(WEXITSTATUS(std::system((std::string(MOEFORGE_BINARY) + " eval " + tuned + " --preferences " +
                                     (dir / "val.jsonl") + " --reference " + pre + " --json > " + out + " 2>/dev/null")
                                        .c_str())),
            0);
  std::ifstream in(out);
  auto e = nlohmann::json::parse(in);
  EXPECT_EQ(e["n"], 12);
  EXPECT_DOUBLE_EQ(e["beta"].get<double>(), 0.5);  // read from the checkpoint's recipe
  EXPECT_NEAR(e["rewards/accuracies"].get<double>(), va[1]["val_rewards/accuracies"].get<double>(), 1e-9);
  EXPECT_NEAR(e["rewards/margins"].get<double>(), va[1]["val_rewards/margins"].get<double>(), 1e-4);

  // Bad input: no init_from, and a pairs file with nothing usable: exit 2.
  std::ofstream(dir / "bad.yaml") << "stage: dpo\n" << kDpoModelYaml << "data: {train: " << (dir / "train.jsonl")
                                  << ", val: " << (dir / "val.jsonl") << "}\noutput_dir: " << (dir / "bad") << "\n";
  EXPECT_EQ(run_quiet(std::string(MOEFORGE_BINARY) + " train " + (dir / "bad.yaml")), 2);
  std::ofstream(dir / "empty.jsonl") << R"({"prompt": "a", "chosen": "b"})" << "\n";
  EXPECT_EQ(run_quiet(std::string(MOEFORGE_BINARY) + " eval " + tuned + " --preferences " + (dir / "empty.jsonl") +
                " --reference " + pre),
            2);
  EXPECT_FALSE(fs::exists(dir / "bad"));
}
