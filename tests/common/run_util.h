// For the tests that run the moeforge binary: a small model as recipe YAML, running a command quietly,
// reading a run's metrics.jsonl, and a free loopback port for multi-process runs.
#pragma once
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

namespace moeforge::test {

// A `model:` mapping for a 2-layer, 4-expert model over the 320-piece test tokenizer; `moe_extra` is
// appended inside the moe flow mapping (e.g. ", router_jitter: 0.1").
inline std::string small_model_yaml(const std::string& name, const std::string& moe_extra = "") {
  return "model:\n  name: " + name +
         "\n  vocab_size: 320\n  hidden_size: 32\n  intermediate_size: 48\n  num_layers: 2\n"
         "  num_attention_heads: 4\n  num_key_value_heads: 2\n  max_position_embeddings: 64\n"
         "  rope_theta: 10000.0\n  moe: {num_experts: 4, num_experts_per_tok: 2, aux_loss_coef: 0.01" +
         moe_extra + "}\n";
}

#ifdef MOEFORGE_BINARY
// The moeforge binary under test.
inline const std::string kBin = MOEFORGE_BINARY;
#endif

// |a - b| relative to the larger of the two (for comparing logged numbers across layouts).
inline double rel(double a, double b) { return std::abs(a - b) / std::max(1e-12, std::max(std::abs(a), std::abs(b))); }

// Exit status of `cmd` run by the shell, its output discarded.
inline int run_quiet(const std::string& cmd) { return WEXITSTATUS(std::system((cmd + " > /dev/null 2>&1").c_str())); }

// The lines of run_dir/metrics.jsonl that have `key`.
inline std::vector<nlohmann::json> metric_records(const std::string& run_dir, const std::string& key) {
  std::vector<nlohmann::json> out;
  std::ifstream in(run_dir + "/metrics.jsonl");
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line);
    if (j.contains(key)) out.push_back(j);
  }
  return out;
}

// A loopback port nobody listens on right now (the kernel's pick for port 0).
inline int free_port() {
  int s = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  ::bind(s, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t len = sizeof a;
  ::getsockname(s, reinterpret_cast<sockaddr*>(&a), &len);
  const int port = ntohs(a.sin_port);
  ::close(s);
  return port;
}

// Runs this test binary again as `world` ranks on loopback (RANK, WORLD_SIZE, MASTER_ADDR/PORT set, plus
// `env`), each running only the tests matching `filter` (a worker test that skips unless its variables are
// set); returns true when every rank exited with status 0.
inline bool run_worker_ranks(int world, const std::string& filter, const std::vector<std::pair<std::string, std::string>>& env) {
  char buf[4096];
  const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  buf[n > 0 ? n : 0] = '\0';
  const std::string exe = buf, flag = "--gtest_filter=" + filter;
  const int port = free_port();
  std::vector<pid_t> pids;
  for (int r = 0; r < world; ++r) {
    const pid_t pid = ::fork();
    if (pid < 0) return false;
    if (pid == 0) {
      for (const auto& [k, v] : env) ::setenv(k.c_str(), v.c_str(), 1);
      ::setenv("RANK", std::to_string(r).c_str(), 1);
      ::setenv("WORLD_SIZE", std::to_string(world).c_str(), 1);
      ::setenv("MASTER_ADDR", "127.0.0.1", 1);
      ::setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
      ::execl(exe.c_str(), exe.c_str(), flag.c_str(), "--gtest_brief=1", static_cast<char*>(nullptr));
      ::_exit(127);
    }
    pids.push_back(pid);
  }
  bool ok = true;
  for (pid_t p : pids) {
    int st = 0;
    ::waitpid(p, &st, 0);
    ok = ok && WIFEXITED(st) && WEXITSTATUS(st) == 0;
  }
  return ok;
}

}  // namespace moeforge::test
