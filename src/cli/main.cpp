#include <exception>
#include <iostream>

#include "cli/cli.h"
#include "core/error.h"

int main(int argc, char** argv) {
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
