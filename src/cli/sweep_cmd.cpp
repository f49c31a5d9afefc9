// moeforge sweep SWEEP.yaml [--jobs N] [--report-only] [--dry-run]
// Runs the sweep's prepare commands (those whose `creates` path is missing), then every point of a grid as
// `moeforge train` in its own directory (finished points skipped, interrupted ones resumed), N at a time, then
// writes the report.
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <map>
#include <thread>

#include "cli/cli.h"
#include "core/error.h"
#include "model/param_count.h"
#include "research/sweep.h"

namespace moeforge::cli {

namespace fs = std::filesystem;

namespace {

std::string self_binary() {
  char buf[4096];
  const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) throw UserError("sweep: cannot find the moeforge binary (/proc/self/exe)");
  buf[n] = '\0';
  std::string path = buf;
  const std::string deleted = " (deleted)";  // the binary was rebuilt while the sweep runs
  if (path.size() > deleted.size() && path.compare(path.size() - deleted.size(), deleted.size(), deleted) == 0)
    path.resize(path.size() - deleted.size());
  return path;
}

// `moeforge ARGS...` with its output appended to log.
pid_t spawn(const std::string& bin, std::vector<std::string> args, const std::string& log) {
  args.insert(args.begin(), bin);
  const pid_t pid = ::fork();
  if (pid < 0) throw UserError("sweep: fork failed");
  if (pid == 0) {
    const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) {
      ::dup2(fd, 1);
      ::dup2(fd, 2);
      ::close(fd);
    }
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    // The very binary this sweep runs (even if a rebuild has replaced the file since): every point of a sweep
    // trains with the same code.
    ::execv("/proc/self/exe", argv.data());
    std::fprintf(stderr, "sweep: exec %s failed: %s\n", bin.c_str(), std::strerror(errno));
    ::_exit(127);
  }
  return pid;
}

// `moeforge train RECIPE --set ... --resume` with its output in run_dir/train.log.
pid_t start_point(const std::string& bin, const train::SweepSpec& spec, const train::SweepPoint& p, int threads) {
  fs::create_directories(p.run_dir);
  std::vector<std::string> args{"train", spec.recipe};
  for (const auto& o : p.overrides) {
    args.push_back("--set");
    args.push_back(o);
  }
  if (p.recipe.runtime.threads == 0) {  // the point's recipe names no thread count: its share of the cores
    args.push_back("--set");
    args.push_back("runtime.threads=" + std::to_string(threads));
  }
  args.push_back("--resume");
  return spawn(bin, args, p.run_dir + "/train.log");
}

std::string status_text(int st) {
  return std::to_string(WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st));
}

}  // namespace

int cmd_sweep(const Args& in) {
  Args args = in;
  std::string v;
  int64_t jobs = 1;
  if (take_option(args, "--jobs", &v)) jobs = parse_int("--jobs", v);
  const bool report_only = take_flag(args, "--report-only");
  const bool dry_run = take_flag(args, "--dry-run");
  reject_unknown_flags(args, "sweep", {"--jobs", "--report-only", "--dry-run"});
  if (args.size() != 1) throw UserError("sweep: expected one SWEEP.yaml");
  if (jobs < 1) throw UserError("sweep: --jobs must be at least 1");
  // Everything is resolved before anything runs: a bad key or value fails here.
  const auto spec = train::load_sweep(args[0]);
  const auto points = train::expand_sweep(spec);
  const auto prepare = train::expand_prepare(spec);
  for (const auto& st : prepare)
    std::fprintf(stderr, "sweep: %-50s %-20s (moeforge %s)\n", st.label.c_str(),
                 fs::exists(st.creates) ? "done, skipped" : "to run", st.args[0].c_str());
  std::vector<const train::SweepPoint*> todo;
  for (const auto& p : points) {
    const auto st = train::point_status(p);
    const char* what = st == train::PointStatus::Finished ? "finished, skipped"
                       : st == train::PointStatus::Interrupted ? "interrupted, resumes" : "to run";
    const ParamCounts pc = count_params(p.recipe.model);
    std::fprintf(stderr, "sweep: %-50s %-20s (%ld parameters, %ld active; expert width %ld)\n", p.name.c_str(), what,
                 (long)pc.total, (long)pc.active, (long)p.recipe.model.intermediate_size);
    if (st != train::PointStatus::Finished) todo.push_back(&p);
  }
  if (dry_run) return 0;
  int failed = 0;
  if (!report_only && !todo.empty()) {
    // The prepare steps, one at a time with every core, before any point (the points may start from them); none
    // when every point has finished (their intermediate outputs may have been cleaned away).
    const std::string log = spec.output_dir + "/prepare.log";
    for (const auto& st : prepare) {
      if (fs::exists(st.creates)) continue;
      fs::create_directories(spec.output_dir);
      std::fprintf(stderr, "sweep: started %s (log %s)\n", st.label.c_str(), log.c_str());
      int status = 0;
      const pid_t pid = spawn(self_binary(), st.args, log);
      while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
      }
      // A failed step is not bad input (exit 1, as a failed point): the points after it would start from nothing.
      if (!(WIFEXITED(status) && WEXITSTATUS(status) == 0)) {
        std::fprintf(stderr, "sweep: %s FAILED (status %s; see %s)\n", st.label.c_str(), status_text(status).c_str(), log.c_str());
        return 1;
      }
      if (!fs::exists(st.creates)) {
        std::fprintf(stderr, "sweep: %s finished but did not create %s (see %s)\n", st.label.c_str(), st.creates.c_str(), log.c_str());
        return 1;
      }
    }
  }
  if (!report_only && !todo.empty()) {
    const std::string bin = self_binary();
    const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    const int threads = std::max(1, cores / static_cast<int>(jobs));
    std::map<pid_t, const train::SweepPoint*> running;
    size_t next = 0;
    while (next < todo.size() || !running.empty()) {
      while (next < todo.size() && static_cast<int64_t>(running.size()) < jobs) {
        const auto* p = todo[next++];
        running[start_point(bin, spec, *p, threads)] = p;
        std::fprintf(stderr, "sweep: started %s (log %s/train.log)\n", p->name.c_str(), p->run_dir.c_str());
      }
      int st = 0;
      const pid_t pid = ::waitpid(-1, &st, 0);
      if (pid < 0) break;
      auto it = running.find(pid);
      if (it == running.end()) continue;
      const bool ok = WIFEXITED(st) && WEXITSTATUS(st) == 0;
      if (!ok) ++failed;
      std::fprintf(stderr, "sweep: %s %s\n", it->second->name.c_str(),
                   ok ? "done" : ("FAILED (status " + status_text(st) +
                                  "; see " + it->second->run_dir + "/train.log)").c_str());
      running.erase(it);
    }
  }
  train::write_sweep_report(spec, points);
  std::fprintf(stderr, "sweep: report in %s/summary.md, summary.csv, report.json\n", spec.output_dir.c_str());
  if (failed) std::fprintf(stderr, "sweep: %d point(s) failed\n", failed);
  return failed ? 1 : 0;
}

}  // namespace moeforge::cli
