// Checkpoint manifests: the hash against values computed independently, the manifest round trip, verification
// (missing, truncated, corrupt, legacy), the fallback of latest_checkpoint and pruning past damaged checkpoints,
// and failed writes (a file-size limit standing in for a full disk) as UserErrors that leave nothing behind.
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
#include <torch/torch.h>

#include <csignal>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>

#include "core/atomic_file.h"
#include "core/error.h"
#include "corpus.h"
#include "io/safetensors.h"
#include "model/decoder.h"
#include "test_util.h"
#include "checkpoint/checkpoint.h"
#include "checkpoint/manifest.h"

using namespace moeforge;
namespace fs = std::filesystem;

namespace {

// byte i = (i * 131 + (i >> 8)) mod 256: not periodic in 32, so every word of a stripe differs.
std::string pattern(size_t n) {
  std::string s(n, '\0');
  for (size_t i = 0; i < n; ++i) s[i] = static_cast<char>((i * 131 + (i >> 8)) & 0xff);
  return s;
}

std::string hex_of(const std::string& s) { return train::hash_hex(train::hash_bytes(s.data(), s.size())); }

void write(const std::string& path, const std::string& bytes) { std::ofstream(path, std::ios::binary) << bytes; }


// A directory with two files and a manifest of them.
std::string manifested_dir(const test::TempDir& tmp) {
  const std::string d = tmp / "ck";
  fs::create_directories(d);
  write(d + "/model.safetensors", pattern(5000));
  write(d + "/config.yaml", "name: tiny\n");
  train::write_manifest(d);
  return d;
}

}  // namespace

// Expected values from an independent Python implementation of the algorithm as manifest.h states it
// (arbitrary-precision integers masked to 64 bits), run once when this test was written.
TEST(Hash64, MatchesTheIndependentReference) {
  EXPECT_EQ(hex_of(""), "306eefe9c768ea31");
  EXPECT_EQ(hex_of("a"), "906be3333786c8ff");
  EXPECT_EQ(hex_of("abc"), "5fafccce42280b11");
  EXPECT_EQ(hex_of("moeforge"), "f54bbc8108d4955c");
  EXPECT_EQ(hex_of(pattern(31)), "6621ab1244222d44");  // one partial stripe
  EXPECT_EQ(hex_of(pattern(32)), "6a6d9d4dbcaae116");  // one full stripe
  EXPECT_EQ(hex_of(pattern(33)), "0e1cde97cb98fc19");
  EXPECT_EQ(hex_of(pattern(1000)), "52957d4c76f4ea7e");
  EXPECT_NE(hex_of("a"), hex_of(std::string("a\0", 2)));  // zero padding does not hide the length
}

TEST(Hash64, AnySplitOfTheStreamGivesTheSameDigest) {
  const std::string s = pattern(1000);
  for (size_t chunk : {1, 5, 31, 32, 33, 100, 999}) {
    train::Hash64 h;
    for (size_t i = 0; i < s.size(); i += chunk) h.update(s.data() + i, std::min(chunk, s.size() - i));
    EXPECT_EQ(train::hash_hex(h.digest()), "52957d4c76f4ea7e") << "chunk " << chunk;
  }
}

// A file longer than one 8 MiB read block: the same Python reference value.
TEST(Manifest, FileHashSpansReadBlocks) {
  test::TempDir tmp("manifest_big");
  write(tmp / "big.bin", pattern((8u << 20) + 37));
  auto m = train::compute_manifest(tmp.path);
  ASSERT_EQ(m.count("big.bin"), 1u);
  EXPECT_EQ(m["big.bin"].bytes, (8u << 20) + 37);
  EXPECT_EQ(m["big.bin"].hash, "fe702ff28172783a");
}

TEST(Manifest, RoundTripListsEveryOtherFile) {
  test::TempDir tmp("manifest_rt");
  const std::string d = manifested_dir(tmp);
  const auto m = train::read_manifest(d);
  EXPECT_EQ(m, train::compute_manifest(d));
  ASSERT_EQ(m.size(), 2u);  // not itself
  EXPECT_EQ(m.at("model.safetensors").bytes, 5000u);
  EXPECT_EQ(m.at("model.safetensors").hash, hex_of(pattern(5000)));
  std::ifstream in(d + "/manifest.json");
  auto j = nlohmann::json::parse(in);
  EXPECT_EQ(j["format"], "moeforge-manifest-1");
  EXPECT_EQ(j["hash"], "moeforge-h64x4-v1");
  EXPECT_EQ(j["files"]["config.yaml"]["bytes"], 11);
}

TEST(Manifest, VerifyFindsMissingTruncatedAndCorruptFiles) {
  test::TempDir tmp("manifest_verify");
  const std::string d = manifested_dir(tmp);
  auto ok = train::verify_checkpoint(d);
  EXPECT_TRUE(ok.ok);
  EXPECT_FALSE(ok.legacy);
  write(d + "/notes.txt", "added later");  // files the manifest does not list are not its business
  EXPECT_TRUE(train::verify_checkpoint(d).ok);

  // Truncated: same name, fewer bytes.
  fs::resize_file(d + "/model.safetensors", 4000);
  auto t = train::verify_checkpoint(d);
  EXPECT_FALSE(t.ok);
  EXPECT_EQ(t.file, "model.safetensors");
  EXPECT_NE(t.problem.find("truncated (4000 of 5000 bytes)"), std::string::npos) << t.problem;

  // Corrupt: one byte flipped, same size.
  std::string flipped = pattern(5000);
  flipped[2500] ^= 0x10;
  write(d + "/model.safetensors", flipped);
  auto c = train::verify_checkpoint(d);
  EXPECT_FALSE(c.ok);
  EXPECT_EQ(c.file, "model.safetensors");
  EXPECT_NE(c.problem.find("corrupt"), std::string::npos) << c.problem;
  const std::string msg = test::user_error_of([&] { train::require_intact_checkpoint(d); });
  EXPECT_EQ(msg.rfind(d + "/model.safetensors: corrupt", 0), 0u) << msg;
  EXPECT_NE(msg.find("; the checkpoint is damaged"), std::string::npos) << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos);

  // Missing.
  write(d + "/model.safetensors", pattern(5000));
  EXPECT_TRUE(train::verify_checkpoint(d).ok);
  fs::remove(d + "/config.yaml");
  auto m = train::verify_checkpoint(d);
  EXPECT_FALSE(m.ok);
  EXPECT_EQ(m.file, "config.yaml");
  EXPECT_NE(m.problem.find("missing"), std::string::npos) << m.problem;

  // A torn manifest is damage too, not a legacy checkpoint.
  write(d + "/config.yaml", "name: tiny\n");
  write(d + "/manifest.json", "{\"format\": \"moeforge-manifest-1\", \"fi");
  auto u = train::verify_checkpoint(d);
  EXPECT_FALSE(u.ok);
  EXPECT_EQ(u.file, "manifest.json");
  // A manifest naming a path outside the directory.
  write(d + "/manifest.json", R"({"format": "moeforge-manifest-1", "hash": "moeforge-h64x4-v1",
                                   "files": {"../x": {"bytes": 1, "hash": "0000000000000000"}}})");
  EXPECT_NE(train::verify_checkpoint(d).problem.find("not a plain file name"), std::string::npos);
}

// A rank other than 0 of a job takes the hashes as rank 0 found them: it checks sizes only (a truncated or missing
// file is still found, cheaply), and a directory it accepted counts as verified in this process.
TEST(Manifest, AcceptedFromRankZeroChecksSizesOnly) {
  test::TempDir tmp("manifest_accept");
  const std::string d = manifested_dir(tmp);
  fs::resize_file(d + "/model.safetensors", 4000);
  auto t = train::accept_checkpoint_verified_by_main(d);
  EXPECT_FALSE(t.ok);
  EXPECT_NE(t.problem.find("truncated (4000 of 5000 bytes)"), std::string::npos) << t.problem;
  // A flipped byte is rank 0's to find (it hashed the same file on the shared file system).
  std::string flipped = pattern(5000);
  flipped[2500] ^= 0x10;
  write(d + "/model.safetensors", flipped);
  EXPECT_FALSE(train::verify_checkpoint(d).ok);
  EXPECT_TRUE(train::accept_checkpoint_verified_by_main(d).ok);
  EXPECT_TRUE(test::user_error_of([&] { train::require_intact_checkpoint(d); }).empty());  // accepted: not hashed again
  // One process: the job's check is require_intact_checkpoint itself (this directory is cached as accepted, so a
  // fresh copy is checked).
  fs::copy(d, d + "-copy", fs::copy_options::recursive);
  EXPECT_NE(test::user_error_of([&] { train::require_intact_checkpoint_once_per_job(d + "-copy", train::JobRanks{}); })
                .find("model.safetensors: corrupt"),
            std::string::npos);
}

TEST(Manifest, LegacyCheckpointWithoutManifestIsAccepted) {
  test::TempDir tmp("manifest_legacy");
  const std::string d = manifested_dir(tmp);
  fs::remove(d + "/manifest.json");
  fs::resize_file(d + "/model.safetensors", 10);  // nothing to check it against
  auto c = train::verify_checkpoint(d);
  EXPECT_TRUE(c.ok);
  EXPECT_TRUE(c.legacy);
  EXPECT_NO_THROW(train::require_intact_checkpoint(d));
}

namespace {
train::CheckpointContents contents(const ModelConfig& c, MixtralForCausalLM m, const train::TrainerState* st) {
  train::CheckpointContents cc;
  cc.config = &c;
  cc.model = m;
  cc.state = st;
  return cc;
}
}  // namespace

// Written checkpoints carry a manifest; readers refuse a damaged one; resume falls back past it; pruning never
// lets damaged newer checkpoints push out the intact one just written.
TEST(Manifest, CheckpointsResumeAndPruneAroundDamage) {
  test::TempDir tmp("manifest_ckpt");
  ModelConfig c = test::tiny_config();
  MixtralForCausalLM m(c);
  init_weights(*m, c.init_std, 1);
  const std::string run = tmp / "run", root = run + "/checkpoints";
  train::TrainerState st;
  st.seq_len = 8;
  for (int64_t step : {1, 2, 5}) {
    st.step = step;
    train::save_checkpoint(run, contents(c, m, &st), 10);
  }
  const std::string s1 = root + "/step_00000001", s2 = root + "/step_00000002", s5 = root + "/step_00000005";
  auto man = train::read_manifest(s5);
  EXPECT_EQ(man.size(), 2u);  // weights only: no optimizer, so no trainer_state.json either
  for (auto f : {"config.yaml", "model.safetensors"}) EXPECT_EQ(man.count(f), 1u) << f;
  EXPECT_EQ(*train::latest_checkpoint(run), s5);

  fs::resize_file(s5 + "/model.safetensors", fs::file_size(s5 + "/model.safetensors") - 1);
  EXPECT_EQ(*train::latest_checkpoint(run), s2);  // with a warning naming the file
  MixtralForCausalLM into(c);
  const std::string msg = test::user_error_of([&] { train::load_model_weights(s5, into); });
  EXPECT_NE(msg.find(s5 + "/model.safetensors: truncated"), std::string::npos) << msg;
  EXPECT_NO_THROW(train::load_model_weights(s2, into));

  // Resumed from step 2, the run writes step 3 with keep 1: steps 1 and 2 go, damaged step 5 stays untouched.
  st.step = 3;
  train::save_checkpoint(run, contents(c, m, &st), 1);
  EXPECT_FALSE(fs::exists(s1));
  EXPECT_FALSE(fs::exists(s2));
  EXPECT_TRUE(fs::exists(s5));
  EXPECT_EQ(*train::latest_checkpoint(run), root + "/step_00000003");

  fs::remove(root + "/step_00000003/config.yaml");
  EXPECT_FALSE(train::latest_checkpoint(run).has_value());  // none intact
}

// A file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored as the CLI does) makes writes fail with EFBIG, like a full
// disk. Run in a child so the limit does not reach this process; exit status 0 = every expectation held.
TEST(Manifest, FailedWritesAreUserErrorsAndLeaveNothingBehind) {
  test::TempDir tmp("manifest_full");
  ModelConfig c = test::tiny_config();
  MixtralForCausalLM m(c);
  init_weights(*m, c.init_std, 1);
  write(tmp / "tok.model", std::string(20000, 'x'));
  const auto zeros = torch::zeros({4096});  // made here: the child runs no tensor kernels
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    std::signal(SIGXFSZ, SIG_IGN);
    rlimit lim{8192, 8192};
    ::setrlimit(RLIMIT_FSIZE, &lim);
    auto expect_full = [&](const std::function<void()>& f, const std::string& path, int code) {
      const std::string msg = test::user_error_of(f);
      if (msg.rfind(path + ": write failed: File too large", 0) != 0 || fs::exists(path)) {
        std::fprintf(stderr, "case %d: '%s'\n", code, msg.c_str());
        ::_exit(code);
      }
    };
    expect_full([&] { write_file(tmp / "a.txt", std::string(10000, 'a')); }, tmp / "a.txt", 10);
    expect_full([&] { write_file_atomic(tmp / "b.txt", std::string(10000, 'b')); }, tmp / "b.txt.tmp", 11);
    expect_full([&] { copy_file_checked(tmp / "tok.model", tmp / "c.model"); }, tmp / "c.model", 12);
    expect_full([&] { io::write_safetensors(tmp / "d.safetensors", {{"x", zeros}}); },
                tmp / "d.safetensors", 13);
    // A whole checkpoint: the error names the temp file, the temp directory is gone, no step directory appears.
    const std::string run = tmp / "run";
    train::TrainerState st;
    st.step = 4;
    st.seq_len = 8;
    const std::string msg = test::user_error_of([&] { train::save_checkpoint(run, contents(c, m, &st), 3); });
    if (msg.find("/checkpoints/.tmp-step_00000004-") == std::string::npos ||
        msg.find("/model.safetensors: write failed: File too large (no checkpoint was written)") == std::string::npos) {
      std::fprintf(stderr, "checkpoint: '%s'\n", msg.c_str());
      ::_exit(14);
    }
    if (!fs::is_empty(run + "/checkpoints")) ::_exit(15);
    ::_exit(0);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status)) << "signal " << (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
  EXPECT_EQ(WEXITSTATUS(status), 0) << "see the child's stderr for the failing case";
}
