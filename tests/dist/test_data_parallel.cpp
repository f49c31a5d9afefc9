// Data parallelism over c10d Gloo on loopback: `moeforge launch` with 2 ranks against one process doing
// the same global batch with gradient accumulation; the launcher's failure handling; rendezvous errors.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "corpus.h"
#include "run_util.h"
#include "model/decoder.h"
#include "checkpoint/checkpoint.h"

using namespace moeforge;
namespace fs = std::filesystem;

namespace {
const std::string kDpModelYaml = test::small_model_yaml("dp-test", ", router_jitter: 0.0");
using test::free_port;
using test::run_quiet;




using test::rel;

// Losses, gradient norms and token counts per step, and the final parameters, agree.
void expect_same_dp_run(const std::string& one, const std::string& two, size_t steps) {
  auto a = test::metric_records(one, "loss"), b = test::metric_records(two, "loss");
  ASSERT_EQ(a.size(), steps);
  ASSERT_EQ(b.size(), steps);
  for (size_t i = 0; i < steps; ++i) {
    EXPECT_LT(rel(a[i]["loss"].get<double>(), b[i]["loss"].get<double>()), 1e-5) << "step " << i + 1;
    EXPECT_LT(rel(a[i]["grad_norm"].get<double>(), b[i]["grad_norm"].get<double>()), 1e-5) << "step " << i + 1;
    EXPECT_EQ(a[i]["tokens"], b[i]["tokens"]) << "step " << i + 1;
    EXPECT_EQ(a[i]["expert_load"], b[i]["expert_load"]) << "step " << i + 1;
  }
  auto ca = *train::latest_checkpoint(one), cb = *train::latest_checkpoint(two);
  auto cfg = train::read_checkpoint_config(ca);
  MixtralForCausalLM ma(cfg), mb(cfg);
  train::load_model_weights(ca, ma);
  train::load_model_weights(cb, mb);
  auto pa = ma->named_parameters(), pb = mb->named_parameters();
  for (const auto& p : pa) {
    const auto& q = pb[p.key()];
    const double scale = p.value().abs().max().item<double>();
    EXPECT_LE((p.value() - q).abs().max().item<double>(), 1e-5 * std::max(1.0, scale)) << p.key();
  }
}
}  // namespace

TEST(DataParallel, TwoRanksEqualOneProcessWithAccumulation) {
  test::TempDir dir("dp");
  std::string data = test::make_prepared(dir, 80);
  std::ofstream(dir / "r.yaml") << "stage: pretrain\n" << kDpModelYaml << "data: {dir: " << data << "}\n"
                                << "train: {micro_batch_size: 2, seq_len: 32, max_steps: 5, log_interval: 1, "
                                   "eval_interval: 5, eval_batches: 2, checkpoint_interval: 5}\n"
                                << "optim: {eps: 1.0e-6, warmup_steps: 1}\nruntime: {threads: 1}\n";
  const std::string bin = MOEFORGE_BINARY;
  ASSERT_EQ(run_quiet(bin + " train " + (dir / "r.yaml") + " --set output_dir=" + (dir / "one") + " --set train.grad_accum=4"), 0);
  ASSERT_EQ(run_quiet(bin + " launch --nproc-per-node 2 --master-port " + std::to_string(free_port()) + " -- train " +
                (dir / "r.yaml") + " --set output_dir=" + (dir / "two") + " --set train.grad_accum=2"),
            0);
  expect_same_dp_run(dir / "one", dir / "two", 5);
  std::ifstream s(dir / "two/summary.json");
  EXPECT_EQ(nlohmann::json::parse(s)["data_parallel_ranks"], 2);
}

TEST(DataParallel, DpoTwoRanksEqualOneProcess) {
  test::TempDir dir("dpdpo");
  std::string data = test::make_prepared(dir, 80);
  const std::string bin = MOEFORGE_BINARY;
  std::ofstream(dir / "pre.yaml") << "stage: pretrain\n" << kDpModelYaml << "data: {dir: " << data << "}\n"
                                  << "train: {micro_batch_size: 4, seq_len: 32, max_steps: 4, eval_batches: 1}\n"
                                  << "runtime: {threads: 1}\noutput_dir: " << (dir / "pre") << "\n";
  ASSERT_EQ(run_quiet(bin + " train " + (dir / "pre.yaml")), 0);
  {
    std::ofstream p(dir / "pairs.jsonl");
    const char* obj[] = {"the moon.", "a red apple.", "the long road.", "the quiet town."};
    for (int i = 0; i < 24; ++i)
      p << nlohmann::json{{"prompt", "the cat sees " + std::to_string(i % 5)}, {"chosen", obj[i % 4]},
                          {"rejected", obj[(i + 1) % 4]}}.dump()
        << "\n";
  }
  std::ofstream(dir / "dpo.yaml") << "stage: dpo\ninit_from: " << *train::latest_checkpoint(dir / "pre")
                                  << "\ndata: {train: " << (dir / "pairs.jsonl") << ", val: " << (dir / "pairs.jsonl")
                                  << "}\ndpo: {beta: 0.5, reference: precompute, rpo_alpha: 0.5}\n"
                                  << "train: {micro_batch_size: 3, seq_len: 48, max_steps: 5, log_interval: 1, "
                                     "eval_interval: 5, eval_batches: 2, checkpoint_interval: 5}\n"
                                  << "optim: {eps: 1.0e-6, lr: 3.0e-3, warmup_steps: 0, schedule: constant}\nruntime: {threads: 1}\n";
  ASSERT_EQ(run_quiet(bin + " train " + (dir / "dpo.yaml") + " --set output_dir=" + (dir / "one") + " --set train.grad_accum=2"), 0);
  ASSERT_EQ(run_quiet(bin + " launch --nproc-per-node 2 --master-port " + std::to_string(free_port()) + " -- train " +
                (dir / "dpo.yaml") + " --set output_dir=" + (dir / "two")),
            0);
  expect_same_dp_run(dir / "one", dir / "two", 5);
}

// One rank killed mid-run: the launcher stops the other and returns the failing rank's status, long before
// the collective timeout would have fired.
TEST(Launch, AKilledRankStopsTheOthers) {
  test::TempDir dir("dpkill");
  std::string data = test::make_prepared(dir, 80);
  std::ofstream(dir / "r.yaml") << "stage: pretrain\n" << kDpModelYaml << "data: {dir: " << data << "}\n"
                                << "train: {micro_batch_size: 2, seq_len: 32, max_steps: 50, checkpoint_interval: 2, "
                                   "eval_interval: 100, eval_batches: 1}\n"
                                << "parallel: {timeout_s: 600}\nruntime: {threads: 1}\noutput_dir: " << (dir / "run") << "\n";
  const auto t0 = std::chrono::steady_clock::now();
  const std::string log = dir / "launch.log";
  const int rc = WEXITSTATUS(std::system(("MOEFORGE_TEST_KILL_AFTER_CHECKPOINT=2 MOEFORGE_TEST_KILL_RANK=1 " +
                                          std::string(MOEFORGE_BINARY) + " launch --nproc-per-node 2 --master-port " +
                                          std::to_string(free_port()) + " -- train " + (dir / "r.yaml") + " > " + log +
                                          " 2>&1")
                                             .c_str()));
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(rc, 128 + 9);  // SIGKILL
  EXPECT_LT(s, 60.0);
  std::ifstream in(log);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_NE(text.find("launch: rank 1 exited with status 137"), std::string::npos) << text.substr(0, 2000);
  EXPECT_NE(text.find("[rank 0] "), std::string::npos);
}

// A rank that never arrives: the others give up at the rendezvous within parallel.timeout_s, exit 2, and
// say where they waited. Bad environment variables are one-line errors.
TEST(Launch, MissingRankAndBadEnvironmentAreClearErrors) {
  test::TempDir dir("dpmiss");
  std::string data = test::make_prepared(dir, 40);
  std::ofstream(dir / "r.yaml") << "stage: pretrain\n" << kDpModelYaml << "data: {dir: " << data << "}\n"
                                << "train: {micro_batch_size: 2, seq_len: 32, max_steps: 2, eval_batches: 1}\n"
                                << "parallel: {timeout_s: 3}\nruntime: {threads: 1}\noutput_dir: " << (dir / "run") << "\n";
  const std::string bin = MOEFORGE_BINARY;
  const auto t0 = std::chrono::steady_clock::now();
  const std::string log = dir / "err.log";
  const int rc = WEXITSTATUS(std::system(("RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=" +
                                          std::to_string(free_port()) + " " + bin + " train " + (dir / "r.yaml") +
                                          " > " + log + " 2>&1")
                                             .c_str()));
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(rc, 2);
  EXPECT_LT(s, 30.0);
  std::ifstream in(log);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_NE(text.find("rendezvous at 127.0.0.1:"), std::string::npos) << text;
  EXPECT_NE(text.find("missing: rank 1"), std::string::npos) << text;
  EXPECT_FALSE(fs::exists(dir / "run/checkpoints"));
  EXPECT_EQ(run_quiet("WORLD_SIZE=2 " + bin + " train " + (dir / "r.yaml")), 2);           // no RANK
  EXPECT_EQ(run_quiet("RANK=5 WORLD_SIZE=2 " + bin + " train " + (dir / "r.yaml")), 2);    // out of range
  EXPECT_EQ(run_quiet("RANK=0 WORLD_SIZE=x " + bin + " train " + (dir / "r.yaml")), 2);    // not a number
  EXPECT_EQ(run_quiet(bin + " launch --nproc-per-node 0 -- train " + (dir / "r.yaml")), 2);
  EXPECT_EQ(run_quiet(bin + " launch --nproc-per-node 2"), 2);                              // no command
  // A layout the processes cannot form: EP=2 in one process, EP=4 over 2 ranks.
  EXPECT_EQ(run_quiet(bin + " train " + (dir / "r.yaml") + " --set parallel.expert=2"), 2);
  EXPECT_EQ(run_quiet(bin + " launch --nproc-per-node 2 --master-port " + std::to_string(free_port()) + " -- train " +
                      (dir / "r.yaml") + " --set parallel.expert=4"),
            2);
}

// Started without the launcher (as under mpirun or Slurm, where nobody stops the others), 3 ranks: rank 1
// dies, or hangs, right after the checkpoint of step 2; ranks 0 and 2 fail their next collective, exit 2
// within parallel.timeout_s (+ a few seconds to see whose beat in the store has stopped) and both name
// rank 1 as the missing one.
TEST(Launch, SurvivorsNameTheMissingRank) {
  test::TempDir dir("dpname");
  std::string data = test::make_prepared(dir, 80);
  std::ofstream(dir / "r.yaml") << "stage: pretrain\n" << kDpModelYaml << "data: {dir: " << data << "}\n"
                                << "train: {micro_batch_size: 2, seq_len: 32, max_steps: 50, checkpoint_interval: 2, "
                                   "eval_interval: 100, eval_batches: 1}\n"
                                << "parallel: {timeout_s: 4}\nruntime: {threads: 1}\noutput_dir: " << (dir / "run") << "\n";
  for (const std::string sig : {"KILL", "STOP"}) {
    const std::string env = "WORLD_SIZE=3 MASTER_ADDR=127.0.0.1 MASTER_PORT=" + std::to_string(free_port()) +
                            " MOEFORGE_TEST_KILL_AFTER_CHECKPOINT=2 MOEFORGE_TEST_KILL_RANK=1 MOEFORGE_TEST_KILL_SIGNAL=" + sig +
                            " ";
    const std::string log0 = dir / ("rank0-" + sig + ".log"), log2 = dir / ("rank2-" + sig + ".log");
    fs::remove_all(dir / "run");
    const auto t0 = std::chrono::steady_clock::now();
    const std::string train = std::string(MOEFORGE_BINARY) + " train " + (dir / "r.yaml");
    const std::string cmd = "RANK=1 " + env + train + " > /dev/null 2>&1 & p1=$!; RANK=2 " + env + train + " > " + log2 +
                            " 2>&1 & p2=$!; RANK=0 " + env + train + " > " + log0 +
                            " 2>&1; rc=$?; wait $p2; rc2=$?; kill -9 $p1 2>/dev/null; wait $p1 2>/dev/null; "
                            "[ $rc2 -eq 2 ] || exit 99; exit $rc";
    const int rc = WEXITSTATUS(std::system(("bash -c '" + cmd + "'").c_str()));
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    EXPECT_EQ(rc, 2) << sig << " (99: rank 2 did not exit 2)";
    EXPECT_LT(s, 60.0) << sig;
    for (const auto& log : {log0, log2}) {
      std::ifstream in(log);
      std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      EXPECT_NE(text.find("rank 1 is missing"), std::string::npos)
          << sig << " " << log << ": " << text.substr(text.size() > 1500 ? text.size() - 1500 : 0);
    }
  }
}
