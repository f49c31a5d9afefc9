#include <malloc.h>

#include <climits>
#include <csignal>
#include <exception>
#include <iostream>

#include "cli/cli.h"
#include "core/error.h"

int main(int argc, char** argv) {
  // (glibc's malloc only: where CMake found tcmalloc it serves every allocation and these are no-ops.)
  // Keep freed memory in the heap instead of handing it back to the kernel after every step:
  // a training step frees and re-allocates the same large buffers, and re-faulting their pages
  // cost half the step time on CPU (2,700 -> 5,900 tokens/s on the quickstart model).
  mallopt(M_TRIM_THRESHOLD, INT_MAX);
  mallopt(M_TOP_PAD, 1 << 30);
  // A file-size limit (ulimit -f) would otherwise kill us with SIGXFSZ mid-checkpoint; ignored, the write
  // returns EFBIG and fails like a full disk: a one-line error, the temp directory removed, exit 2.
  std::signal(SIGXFSZ, SIG_IGN);
  // A peer rank that died leaves its sockets closed: a write to one must fail (EPIPE, a one-line error naming the
  // missing rank), not kill this rank with SIGPIPE before it can say so (seen under load: exit 141).
  std::signal(SIGPIPE, SIG_IGN);
  moeforge::cli::Args args(argv + 1, argv + argc);
  try {
    return moeforge::cli::run(args);
  } catch (const moeforge::UserError& e) {
    std::cerr << "moeforge: error: " << e.what() << "\n";
    return moeforge::kUserErrorExit;
  } catch (const std::exception& e) {
    std::string msg = e.what();
    auto nl = msg.find('\n');  // c10::Error carries a backtrace after the first line
    std::cerr << "moeforge: internal error: " << msg.substr(0, nl) << "\n";
    return 1;
  }
}
