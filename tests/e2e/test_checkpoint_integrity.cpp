// End to end: damaged checkpoints and a full disk, through the moeforge binary. A resume falls back past a
// truncated checkpoint; readers refuse a corrupt one with one line naming the file; a checkpoint write that runs
// into a file-size limit (standing in for a full disk) exits 2 and leaves the previous checkpoint as it was.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "corpus.h"
#include "run_util.h"
#include "checkpoint/checkpoint.h"
#include "checkpoint/manifest.h"

using namespace moeforge;
namespace fs = std::filesystem;

namespace {

using test::kBin;

// A tiny pretraining recipe: 4 steps, a checkpoint every 2, the newest 3 kept.
std::string write_integrity_recipe(const test::TempDir& dir, const std::string& data, const std::string& out) {
  const std::string path = dir / "recipe.yaml";
  std::ofstream(path) << "stage: pretrain\n" << test::small_model_yaml("integrity") << "data: {dir: " << data << "}\n"
                      << "train: {micro_batch_size: 4, seq_len: 32, max_steps: 4, log_interval: 1, eval_interval: 100, "
                         "eval_batches: 2, checkpoint_interval: 2, keep_checkpoints: 3, seed: 11}\n"
                      << "runtime: {threads: 1}\noutput_dir: " << out << "\n";
  return path;
}

struct CliResult {
  int status;
  std::string err;
};

// `prefix` runs in the same shell first (e.g. "ulimit -f 64;").
CliResult cli(const std::string& args, const std::string& prefix = "") {
  const std::string err_file = fs::temp_directory_path() / ("moeforge_integrity_err_" + std::to_string(::getpid()));
  const int rc = std::system((prefix + " " + kBin + " " + args + " >/dev/null 2>" + err_file).c_str());
  std::ifstream in(err_file);
  std::string err((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  fs::remove(err_file);
  return {WIFEXITED(rc) ? WEXITSTATUS(rc) : 128 + WTERMSIG(rc), err};
}

// The line of stderr the CLI prints for a UserError.
std::string error_line(const std::string& err) {
  const auto at = err.find("moeforge: error: ");
  if (at == std::string::npos) return "";
  return err.substr(at, err.find('\n', at) - at);
}

void expect_damage_refused(const CliResult& r, const std::string& file) {
  EXPECT_EQ(r.status, 2) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;  // one line, nothing else
  EXPECT_NE(r.err.find(file + ": corrupt"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("the checkpoint is damaged"), std::string::npos) << r.err;
}

std::vector<int> train_steps(const std::string& run_dir) {
  std::vector<int> s;
  for (const auto& j : test::metric_records(run_dir, "loss")) s.push_back(j["step"].get<int>());
  return s;
}

}  // namespace

// (a) The newest checkpoint truncated: the resume warns naming the file and continues from the one before.
TEST(CheckpointIntegrity, ResumeFallsBackPastATruncatedCheckpoint) {
  test::TempDir dir("integrity_resume");
  const std::string data = test::make_prepared(dir, 80), out = dir / "run";
  const std::string recipe = write_integrity_recipe(dir, data, out);
  ASSERT_EQ(cli("train " + recipe).status, 0);
  const auto first = test::metric_records(out, "loss");
  ASSERT_EQ(first.size(), 4u);
  const std::string s4 = out + "/checkpoints/step_00000004";
  ASSERT_TRUE(train::verify_checkpoint(s4).ok);
  ASSERT_TRUE(fs::exists(s4 + "/manifest.json"));
  fs::resize_file(s4 + "/model.safetensors", fs::file_size(s4 + "/model.safetensors") / 2);

  const CliResult r = cli("train " + recipe + " --resume --set train.max_steps=6");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.err.find("[moeforge warn] " + s4 + "/model.safetensors: truncated"), std::string::npos) << r.err;
  // Resumed from step 2 (metrics.jsonl drops the lines written after the checkpoint it resumes): steps 3 and 4
  // ran again from step 2's state, and step 3's loss (the weights of step 2, before any update under the longer
  // schedule) is the first run's, the same double (resumes are bitwise).
  EXPECT_EQ(train_steps(out), (std::vector<int>{1, 2, 3, 4, 5, 6}));
  auto l = test::metric_records(out, "loss");
  ASSERT_EQ(l.size(), 6u);
  EXPECT_EQ(l[2]["loss"], first[2]["loss"]);
  // Step 4 was written again, whole; step 6 is the newest.
  EXPECT_TRUE(train::verify_checkpoint(s4).ok);
  EXPECT_EQ(*train::latest_checkpoint(out), out + "/checkpoints/step_00000006");
}

// (b) A flipped byte (same size): every reader refuses the checkpoint on one line naming the file.
TEST(CheckpointIntegrity, ReadersRefuseACorruptCheckpoint) {
  test::TempDir dir("integrity_corrupt");
  const std::string data = test::make_prepared(dir, 80), out = dir / "run";
  ASSERT_EQ(cli("train " + write_integrity_recipe(dir, data, out) + " --set train.max_steps=2").status, 0);
  const std::string ck = out + "/checkpoints/step_00000002", weights = ck + "/model.safetensors";
  const auto size = fs::file_size(weights);
  auto flip_last_byte = [&] {  // in the data section: the file still parses
    std::fstream f(weights, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(static_cast<std::streamoff>(size) - 1);
    const char c = static_cast<char>(f.get());
    f.seekp(static_cast<std::streamoff>(size) - 1);
    f.put(static_cast<char>(c ^ 0x40));
  };
  flip_last_byte();
  ASSERT_EQ(fs::file_size(weights), size);

  expect_damage_refused(cli("export " + ck + " --format hf --out " + (dir / "hf")), weights);
  EXPECT_FALSE(fs::exists(dir / "hf"));
  expect_damage_refused(cli("eval " + ck + " --data " + data + " --batches 1"), weights);
  expect_damage_refused(cli("generate " + ck + " --prompt 'The cat' --max-new-tokens 2"), weights);
  const CliResult init = cli("train " + write_integrity_recipe(dir, data, dir / "ft") + " --set init_from=" + ck);
  EXPECT_EQ(init.status, 2) << init.err;
  EXPECT_NE(error_line(init.err).find(weights + ": corrupt"), std::string::npos) << init.err;

  // Repaired, it exports; without a manifest (a checkpoint from before manifests) it is read unchecked.
  flip_last_byte();
  ASSERT_EQ(cli("export " + ck + " --format hf --out " + (dir / "hf")).status, 0);
  fs::remove(ck + "/manifest.json");
  ASSERT_EQ(cli("export " + ck + " --format hf --out " + (dir / "hf2")).status, 0);
}

// (c) The disk fills during a checkpoint (a file-size limit: writes fail with EFBIG; the CLI ignores SIGXFSZ):
// exit 2 with one line naming the file, no step_4 or temp directory left, step_2 intact and resumable.
TEST(CheckpointIntegrity, FullDiskDuringACheckpointKeepsThePreviousOne) {
  test::TempDir dir("integrity_full");
  const std::string data = test::make_prepared(dir, 80), out = dir / "run";
  const std::string recipe = write_integrity_recipe(dir, data, out);
  ASSERT_EQ(cli("train " + recipe + " --set train.max_steps=2").status, 0);
  const std::string s2 = out + "/checkpoints/step_00000002";
  // The limit: between a quarter and half of model.safetensors whether the shell counts ulimit -f in 512- or
  // 1024-byte blocks (dash: 512, bash: 1024), far above the run's other files (metrics, events, tokenizer).
  const auto model_bytes = fs::file_size(s2 + "/model.safetensors");
  for (auto f : {"tokenizer.model", "config.yaml", "recipe.yaml", "trainer_state.json"})
    ASSERT_LT(fs::file_size(s2 + "/" + f), model_bytes / 8) << f;
  ASSERT_LT(fs::file_size(out + "/metrics.jsonl"), model_bytes / 16);
  const std::string limit = "ulimit -f " + std::to_string(model_bytes / 2048) + ";";

  const CliResult r = cli("train " + recipe + " --resume", limit);
  EXPECT_EQ(r.status, 2) << r.err;
  const std::string line = error_line(r.err);
  EXPECT_NE(line.find(out + "/checkpoints/.tmp-step_00000004-"), std::string::npos) << r.err;
  EXPECT_NE(line.find("/model.safetensors: write failed: File too large"), std::string::npos) << r.err;
  EXPECT_NE(line.find("the previous checkpoint, step_00000002, is untouched"), std::string::npos) << r.err;
  EXPECT_EQ(train_steps(out), (std::vector<int>{1, 2, 3, 4}));  // the metrics lines were written
  std::vector<std::string> left;
  for (auto& e : fs::directory_iterator(out + "/checkpoints")) left.push_back(e.path().filename().string());
  EXPECT_EQ(left, std::vector<std::string>{"step_00000002"});
  const auto check = train::verify_checkpoint(s2);
  EXPECT_TRUE(check.ok && !check.legacy) << check.message(s2);

  // With room again the run resumes from step 2 and finishes.
  const CliResult again = cli("train " + recipe + " --resume");
  ASSERT_EQ(again.status, 0) << again.err;
  EXPECT_EQ(train_steps(out), (std::vector<int>{1, 2, 3, 4}));  // the failed run's steps 3, 4 dropped, then run again
  EXPECT_EQ(*train::latest_checkpoint(out), out + "/checkpoints/step_00000004");
}
