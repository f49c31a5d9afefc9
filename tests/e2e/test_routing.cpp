// `moeforge routing` on a trained checkpoint: the JSON interface, its consistency with the data, errors.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "corpus.h"
#include "run_util.h"
#include "data/token_shard.h"
#include "checkpoint/checkpoint.h"

using namespace moeforge;

TEST(RoutingCommand, JsonOnATrainedCheckpoint) {
  test::TempDir dir("routing");
  std::string data = test::make_prepared(dir, 80, 0.25);
  const std::string bin = MOEFORGE_BINARY;
  std::ofstream(dir / "r.yaml") << "stage: pretrain\n" << test::small_model_yaml("routing-test") << "data: {dir: " << data
                                << "}\ntrain: {micro_batch_size: 4, seq_len: 32, max_steps: 3, eval_batches: 1}\n"
                                << "runtime: {threads: 1}\noutput_dir: " << (dir / "run") << "\n";
  ASSERT_EQ(test::run_quiet(bin + " train " + (dir / "r.yaml")), 0);
  const std::string ckpt = *train::latest_checkpoint(dir / "run");
  const std::string out = dir / "routing.json";
  ASSERT_EQ(std::system((bin + " routing " + ckpt + " --data " + data + " --seq-len 16 --json > " + out + " 2>/dev/null").c_str()), 0);
  std::ifstream in(out);
  auto j = nlohmann::json::parse(in);
  // Every val document routed: its tokens plus <s>, in chunks of 16 (a 1-token tail is dropped).
  data::TokenDataset ds(data, "val");
  int64_t expect = 0;
  for (size_t s = 0; s < ds.num_shards(); ++s)
    for (uint64_t d = 0; d < ds.shard(s).num_docs(); ++d) {
      const int64_t n = static_cast<int64_t>(ds.shard(s).doc_length(d)) + 1;
      expect += n - (n % 16 == 1 ? 1 : 0);
    }
  EXPECT_EQ(j["tokens"].get<int64_t>(), expect);
  ASSERT_EQ(j["layers"].size(), 2u);
  for (const auto& L : j["layers"]) {
    EXPECT_DOUBLE_EQ(L["random_first_choice_rate"].get<double>(), 0.25);
    const double r = L["first_choice_repeat_rate"].get<double>();
    EXPECT_GE(r, 0.0);
    EXPECT_LE(r, 1.0);
    int64_t load = 0;
    for (auto c : L["load"]) load += c.get<int64_t>();
    EXPECT_EQ(load, 2 * expect);  // top-2
    for (const auto& [dom, share] : L["expert_share_by_domain"].items()) {
      double sum = 0;
      for (auto s : share) sum += s.get<double>();
      EXPECT_NEAR(sum, 1.0, 1e-9) << dom;
    }
    EXPECT_FALSE(L["expert_share_by_domain"].empty());
  }
  // Bad input: a missing flag, a bad split, a directory that is not prepared data.
  EXPECT_EQ(test::run_quiet(bin + " routing " + ckpt), 2);
  EXPECT_EQ(test::run_quiet(bin + " routing " + ckpt + " --data " + data + " --split test"), 2);
  EXPECT_EQ(test::run_quiet(bin + " routing " + ckpt + " --data " + (dir / "tok")), 2);
}
