// moeforge launch: starts the local processes of a multi-process job (as torchrun does), with the
// standard environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT),
// prefixes their output with their rank, stops them all when one fails, and returns its exit status.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "cli/cli.h"
#include "core/error.h"

namespace moeforge::cli {

namespace {

volatile sig_atomic_t g_stop_signal = 0;
void on_signal(int s) { g_stop_signal = s; }

struct Child {
  pid_t pid = -1;
  int rank = 0;
  int out_fd = -1;  // stdout and stderr together
  std::string partial;
  bool running = true;
  int status = 0;
};

void emit_lines(Child& c, const char* data, size_t n, bool flush_all) {
  c.partial.append(data, n);
  size_t start = 0;
  for (size_t nl; (nl = c.partial.find('\n', start)) != std::string::npos; start = nl + 1)
    std::fprintf(stderr, "[rank %d] %s\n", c.rank, c.partial.substr(start, nl - start).c_str());
  c.partial.erase(0, start);
  if (flush_all && !c.partial.empty()) {
    std::fprintf(stderr, "[rank %d] %s\n", c.rank, c.partial.c_str());
    c.partial.clear();
  }
}

int exit_code(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return 1;
}

}  // namespace

int cmd_launch(const Args& in) {
  Args args = in;
  Args command;
  for (size_t i = 0; i < args.size(); ++i)
    if (args[i] == "--") {
      command.assign(args.begin() + static_cast<long>(i) + 1, args.end());
      args.resize(i);
      break;
    }
  std::string v;
  int64_t nproc = 1, nnodes = 1, node_rank = 0, port = 29500;
  std::string addr = "127.0.0.1";
  if (take_option(args, "--nproc-per-node", &v)) nproc = parse_int("--nproc-per-node", v);
  if (take_option(args, "--nnodes", &v)) nnodes = parse_int("--nnodes", v);
  if (take_option(args, "--node-rank", &v)) node_rank = parse_int("--node-rank", v);
  if (take_option(args, "--master-port", &v)) port = parse_int("--master-port", v);
  take_option(args, "--master-addr", &addr);
  reject_unknown_flags(args, "launch", {"--nproc-per-node", "--nnodes", "--node-rank", "--master-addr", "--master-port"},
                       /*last=*/false);
  if (args_only() && !command.empty()) return dispatch(command);  // the launched command's line, checked the same way
  if (!args.empty() || command.empty())
    throw UserError("launch: usage: moeforge launch --nproc-per-node N [--nnodes M --node-rank R --master-addr A "
                    "--master-port P] -- COMMAND ARGS... (e.g. -- train recipe.yaml)");
  if (nproc < 1 || nproc > 1024) throw UserError("launch: --nproc-per-node must be in [1, 1024]");
  if (nnodes < 1) throw UserError("launch: --nnodes must be positive");
  if (node_rank < 0 || node_rank >= nnodes) throw UserError("launch: --node-rank must be in [0, nnodes)");
  if (port < 1 || port > 65535) throw UserError("launch: --master-port must be in [1, 65535]");
  const int64_t world = nproc * nnodes;

  char self[4096];
  const ssize_t len = ::readlink("/proc/self/exe", self, sizeof self - 1);
  if (len <= 0) throw UserError("launch: cannot find the moeforge binary (/proc/self/exe)");
  self[len] = '\0';

  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);

  std::vector<Child> children(static_cast<size_t>(nproc));
  for (int64_t i = 0; i < nproc; ++i) {
    int fds[2];
    if (::pipe(fds) != 0) throw UserError("launch: pipe failed");
    Child& c = children[static_cast<size_t>(i)];
    c.rank = static_cast<int>(node_rank * nproc + i);
    const pid_t pid = ::fork();
    if (pid < 0) throw UserError("launch: fork failed");
    if (pid == 0) {
      ::setpgid(0, 0);
      ::dup2(fds[1], STDOUT_FILENO);
      ::dup2(fds[1], STDERR_FILENO);
      ::close(fds[0]);
      ::close(fds[1]);
      ::setenv("RANK", std::to_string(c.rank).c_str(), 1);
      ::setenv("WORLD_SIZE", std::to_string(world).c_str(), 1);
      ::setenv("LOCAL_RANK", std::to_string(i).c_str(), 1);
      ::setenv("LOCAL_WORLD_SIZE", std::to_string(nproc).c_str(), 1);
      ::setenv("MASTER_ADDR", addr.c_str(), 1);
      ::setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
      std::vector<char*> argv{self};
      for (auto& a : command) argv.push_back(const_cast<char*>(a.c_str()));
      argv.push_back(nullptr);
      ::execv(self, argv.data());
      std::fprintf(stderr, "launch: exec %s failed: %s\n", self, std::strerror(errno));
      ::_exit(127);
    }
    ::close(fds[1]);
    c.pid = pid;
    c.out_fd = fds[0];
  }

  int result = 0;
  bool stopping = false;
  auto stop_all = [&](int sig) {
    for (auto& c : children)
      if (c.running) ::kill(-c.pid, sig);
  };
  auto stop_deadline = std::chrono::steady_clock::time_point::max();
  size_t running = children.size();
  while (running > 0) {
    std::vector<pollfd> pfds;
    for (auto& c : children)
      if (c.out_fd >= 0) pfds.push_back(pollfd{c.out_fd, POLLIN, 0});
    ::poll(pfds.data(), pfds.size(), 200);
    for (auto& p : pfds) {
      if (!(p.revents & (POLLIN | POLLHUP | POLLERR))) continue;
      for (auto& c : children) {
        if (c.out_fd != p.fd) continue;
        char buf[8192];
        const ssize_t n = ::read(c.out_fd, buf, sizeof buf);
        if (n > 0) {
          emit_lines(c, buf, static_cast<size_t>(n), false);
        } else {
          emit_lines(c, "", 0, true);
          ::close(c.out_fd);
          c.out_fd = -1;
        }
      }
    }
    for (auto& c : children) {
      if (!c.running) continue;
      int st = 0;
      if (::waitpid(c.pid, &st, WNOHANG) != c.pid) continue;
      c.running = false;
      c.status = st;
      --running;
      const int code = exit_code(st);
      if (code != 0 && !stopping) {
        std::fprintf(stderr, "launch: rank %d exited with status %d; stopping the other ranks\n", c.rank, code);
        result = code;
        stopping = true;
        stop_all(SIGTERM);
        stop_deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
      }
    }
    if (g_stop_signal && !stopping) {
      std::fprintf(stderr, "launch: signal %d; stopping every rank\n", static_cast<int>(g_stop_signal));
      result = 128 + g_stop_signal;
      stopping = true;
      stop_all(SIGTERM);
      stop_deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    }
    if (stopping && std::chrono::steady_clock::now() > stop_deadline) {
      stop_all(SIGKILL);
      stop_deadline = std::chrono::steady_clock::time_point::max();
    }
  }
  for (auto& c : children)
    if (c.out_fd >= 0) {
      char buf[8192];
      for (ssize_t n; (n = ::read(c.out_fd, buf, sizeof buf)) > 0;) emit_lines(c, buf, static_cast<size_t>(n), false);
      emit_lines(c, "", 0, true);
      ::close(c.out_fd);
    }
  return result;
}

}  // namespace moeforge::cli
