// Inference under expert parallelism (issue 15): `moeforge launch -- eval | generate | routing` splits every
// layer's experts over the ranks, so no rank holds the whole model. Against the same command in one process:
// the held-out loss and perplexity (text and data), greedy completions token for token, sampled text with the
// same seed, and the routing analysis; only rank 0 reports. Each rank builds only its share (the counting
// allocator: see PerRankBuild.InferenceLoadsOnlyTheShare).
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "corpus.h"
#include "run_util.h"
#include "checkpoint/checkpoint.h"

using namespace moeforge;
namespace fs = std::filesystem;

namespace {
using test::kBin;

// stdout and stderr of `cmd` (status in *rc).
std::string output_of(const std::string& cmd, const std::string& file, int* rc) {
  *rc = WEXITSTATUS(std::system((cmd + " > " + file + " 2>&1").c_str()));
  std::ifstream in(file);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The lines a launched job's rank `r` printed that start with `head` (the launcher prefixes "[rank r] ").
std::vector<std::string> rank_lines(const std::string& text, int r, const std::string& head) {
  std::vector<std::string> out;
  std::istringstream in(text);
  const std::string prefix = "[rank " + std::to_string(r) + "] " + head;
  for (std::string line; std::getline(in, line);)
    if (line.rfind(prefix, 0) == 0) out.push_back(line.substr(prefix.size() - head.size()));
  return out;
}

// `command` may start with VAR=value words: they go in front, into every rank's environment.
std::string launched(int ranks, std::string command) {
  std::string env;
  while (!command.empty() && command[0] != ' ' && command.find('=') < command.find(' ')) {
    const auto sp = command.find(' ');
    env += command.substr(0, sp) + " ";
    command = command.substr(sp);
  }
  return env + kBin + " launch --nproc-per-node " + std::to_string(ranks) + " --master-port " +
         std::to_string(test::free_port()) + " -- " + command;
}
}  // namespace

TEST(ParallelInference, EvalGenerateRoutingUnderExpertParallelismEqualOneProcess) {
  test::TempDir dir("epinfer");
  const std::string data = test::make_prepared(dir, 80);
  std::ofstream(dir / "pre.yaml") << "stage: pretrain\n"
                                  << test::small_model_yaml("infer-test", ", router_jitter: 0.0")
                                  << "data: {dir: " << data << "}\n"
                                  << "train: {micro_batch_size: 4, seq_len: 32, max_steps: 6, eval_batches: 1}\n"
                                  << "optim: {lr: 3.0e-3, warmup_steps: 1}\nruntime: {threads: 1}\noutput_dir: "
                                  << (dir / "pre") << "\n";
  ASSERT_EQ(test::run_quiet(kBin + " train " + (dir / "pre.yaml")), 0);
  const std::string ck = *train::latest_checkpoint(dir / "pre");
  std::ofstream(dir / "t.txt") << "the cat sees the moon and the long road to the quiet town.\n";
  int rc = 0;
  const std::string eval_data = " eval " + ck + " --data " + data + " --seq-len 32 --batches 3 --json --threads 1";
  const std::string eval_text = " eval " + ck + " --text " + (dir / "t.txt") + " --json --threads 1";
  const std::string greedy = " generate " + ck + " --prompt 'the cat' --max-new-tokens 12 --threads 1";
  const std::string sampled = greedy + " --temperature 0.9 --top-p 0.9 --seed 5";
  const std::string routing = " routing " + ck + " --data " + data + " --seq-len 32 --max-tokens 400 --json --threads 1";
  auto one = [&](const std::string& c) {  // stdout only
    auto out = output_of("(" + kBin + c + " 2>/dev/null)", dir / "one.txt", &rc);
    EXPECT_EQ(rc, 0) << c;
    return out;
  };
  const auto j_data = nlohmann::json::parse(one(eval_data)), j_text = nlohmann::json::parse(one(eval_text));
  const std::string g_one = one(greedy), s_one = one(sampled);
  const auto j_routing = nlohmann::json::parse(one(routing));
  ASSERT_GT(g_one.size(), std::string("the cat\n").size());
  for (int ranks : {2, 4}) {
    const std::string what = std::to_string(ranks) + " ranks";
    auto ep = [&](const std::string& c, const std::string& head) {
      const auto text = output_of(launched(ranks, c), dir / "ep.txt", &rc);
      EXPECT_EQ(rc, 0) << what << ": " << c << "\n" << text.substr(0, 3000);
      for (int r = 1; r < ranks; ++r) EXPECT_TRUE(rank_lines(text, r, head).empty()) << what << ": rank " << r << " reported";
      auto lines = rank_lines(text, 0, head);
      EXPECT_EQ(lines.size(), 1u) << what << ": " << c << "\n" << text.substr(0, 3000);
      return lines.empty() ? std::string() : lines.front();
    };
    for (const auto& [cmd, expected] : {std::pair<std::string, nlohmann::json>{eval_data, j_data}, {eval_text, j_text}}) {
      const std::string line = ep(cmd, "{");
      if (line.empty()) continue;
      const auto j = nlohmann::json::parse(line);
      EXPECT_EQ(j["tokens"], expected["tokens"]) << what << cmd;
      EXPECT_NEAR(j["loss"].get<double>(), expected["loss"].get<double>(), 1e-5 * expected["loss"].get<double>()) << what << cmd;
    }
    // Completions: the one-process text exactly (greedy: the same argmax; sampled: rank 0's draws, same seed).
    EXPECT_EQ(ep(greedy, "the cat") + "\n", g_one) << what;
    EXPECT_EQ(ep(sampled, "the cat") + "\n", s_one) << what;
    // The same with every rank but 0 drawing from another stream: rank 0's tokens are what they all continue with.
    EXPECT_EQ(ep("MOEFORGE_TEST_RANK_SEEDS=1" + sampled, "the cat") + "\n", s_one) << what;
    const std::string rl = ep(routing, "{");
    if (!rl.empty()) {
      const auto j = nlohmann::json::parse(rl);
      EXPECT_EQ(j["tokens"], j_routing["tokens"]) << what;
      EXPECT_EQ(j["layers"], j_routing["layers"]) << what;  // the same top-k choices give the same statistics
    }
  }
  // A damaged checkpoint: rank 0 hashes it for the job and names the file; every rank stops (status 2).
  fs::copy(ck, dir / "bad", fs::copy_options::recursive);
  {
    std::fstream f(dir / "bad/model.safetensors", std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(-3, std::ios::end);
    char ch = 0;
    f.get(ch);
    f.seekp(-3, std::ios::end);
    f.put(static_cast<char>(ch ^ 0x10));
  }
  {
    const auto text = output_of(launched(2, " eval " + (dir / "bad") + " --text " + (dir / "t.txt")), dir / "dmg.txt", &rc);
    EXPECT_EQ(rc, 2) << text;
    EXPECT_FALSE(rank_lines(text, 0, "moeforge: error: " + (dir / "bad/model.safetensors") + ": corrupt").empty()) << text;
  }
  // A world that does not split the experts: one line naming the checkpoint, status 2.
  const auto text = output_of(launched(3, eval_text), dir / "bad.txt", &rc);
  EXPECT_EQ(rc, 2) << text;
  EXPECT_NE(text.find("do not split evenly over 3 ranks"), std::string::npos) << text;
}
