// End to end: pretrain a little, then `stage: sft` from that checkpoint on prompt/completion pairs.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "corpus.h"
#include "run_util.h"
#include "checkpoint/checkpoint.h"

using namespace moeforge;
namespace fs = std::filesystem;

namespace {
const std::string kSftModelYaml = test::small_model_yaml("sft-e2e");

std::vector<double> sft_losses(const std::string& run_dir) {
  std::vector<double> out;
  for (const auto& j : test::metric_records(run_dir, "loss")) out.push_back(j["loss"].get<double>());
  return out;
}

// A learnable mapping: subject i always gets object i.
void write_sft_pairs(const std::string& path, int n, int offset) {
  static const char* subj[] = {"the cat", "a dog", "the old man", "my sister", "the river", "a small bird"};
  static const char* obj[] = {"the moon.", "a red apple.", "the long road.", "the quiet town.", "a green boat.",
                              "the winter sky."};
  std::ofstream out(path);
  for (int i = 0; i < n; ++i) {
    int k = (i + offset) % 6;
    if (i % 3 == 0) {
      out << nlohmann::json{{"messages", {{{"role", "user"}, {"content", std::string(subj[k]) + " sees"}},
                                          {{"role", "assistant"}, {"content", obj[k]}}}}}.dump() << "\n";
    } else {
      out << nlohmann::json{{"prompt", std::string(subj[k]) + " sees"}, {"completion", obj[k]}}.dump() << "\n";
    }
  }
}

}  // namespace

TEST(Sft, FineTunesFromAPretrainedCheckpoint) {
  test::TempDir dir("sfte2e");
  std::string data = test::make_prepared(dir, 80);
  std::ofstream(dir / "pre.yaml") << "stage: pretrain\n" << kSftModelYaml << "data: {dir: " << data << "}\n"
                                  << "train: {micro_batch_size: 4, seq_len: 32, max_steps: 10, eval_batches: 2}\n"
                                  << "runtime: {threads: 1}\noutput_dir: " << (dir / "pre") << "\n";
  ASSERT_EQ(std::system((std::string(MOEFORGE_BINARY) + " train " + (dir / "pre.yaml") + " 2>/dev/null").c_str()), 0);
  auto pre = *train::latest_checkpoint(dir / "pre");
  write_sft_pairs(dir / "train.jsonl", 60, 0);
  write_sft_pairs(dir / "val.jsonl", 12, 3);
  // No model key: the config (and the tokenizer) come from the checkpoint.
  std::ofstream(dir / "sft.yaml") << "stage: sft\ninit_from: " << pre << "\ndata: {train: " << (dir / "train.jsonl")
                                  << ", val: " << (dir / "val.jsonl") << "}\n"
                                  << "train: {micro_batch_size: 4, seq_len: 32, max_steps: 40, log_interval: 1, "
                                     "eval_interval: 40, eval_batches: 4, checkpoint_interval: 20}\n"
                                  << "optim: {lr: 3.0e-3, min_lr: 3.0e-4, warmup_steps: 2}\n"
                                  << "runtime: {threads: 1}\noutput_dir: " << (dir / "sft") << "\n";
  ASSERT_EQ(std::system((std::string(MOEFORGE_BINARY) + " train " + (dir / "sft.yaml") + " 2>/dev/null").c_str()), 0);
  auto l = sft_losses(dir / "sft");
  ASSERT_EQ(l.size(), 40u);
  double first = (l[0] + l[1] + l[2]) / 3, last = (l[37] + l[38] + l[39]) / 3;
  EXPECT_LT(last, first - 1.0) << "first " << first << " last " << last;
  std::ifstream in(dir / "sft/summary.json");
  auto s = nlohmann::json::parse(in);
  EXPECT_EQ(s["stage"], "sft");
  EXPECT_EQ(s["sft_examples"], 60);
  EXPECT_LT(s["final_val_loss"].get<double>(), first);
  // The SFT checkpoint is self-contained (the tokenizer came along).
  EXPECT_TRUE(fs::exists(*train::latest_checkpoint(dir / "sft") + "/tokenizer.model"));
  // Greedy exact match on the held-out pairs.
  std::string ej = dir / "em.json";
  ASSERT_EQ(std::system((std::string(MOEFORGE_BINARY) + " eval " + *train::latest_checkpoint(dir / "sft") +
                         " --generate --data " + (dir / "val.jsonl") + " --max-new-tokens 12 --json > " + ej).c_str()),
            0);
  std::ifstream ein(ej);
  auto em = nlohmann::json::parse(ein);
  EXPECT_EQ(em["n"], 12);
  EXPECT_GE(em["exact_match"].get<double>(), 0.0);
  EXPECT_LE(em["exact_match"].get<double>(), 1.0);
  EXPECT_DOUBLE_EQ(em["exact_match"].get<double>(), em["correct"].get<double>() / 12.0);
  // A missing val file is a one-line error with exit 2.
  std::ofstream(dir / "bad.yaml") << "stage: sft\ninit_from: " << pre << "\ndata: {train: " << (dir / "train.jsonl")
                                  << "}\noutput_dir: " << (dir / "bad") << "\n";
  int rc = std::system((std::string(MOEFORGE_BINARY) + " train " + (dir / "bad.yaml") + " 2>/dev/null").c_str());
  EXPECT_EQ(WEXITSTATUS(rc), 2);
}
