// Errors a user can cause (bad config, bad file, missing path) are UserError:
// the CLI prints the message on one line and exits with status 2. Bugs are
// assertions (MF_CHECK), never UserError.
#pragma once
#include <stdexcept>
#include <string>
#include <vector>

namespace moeforge {

class UserError : public std::runtime_error {
 public:
  explicit UserError(const std::string& msg) : std::runtime_error(msg) {}
};

// Exit status for errors the user can fix.
constexpr int kUserErrorExit = 2;

// Edit distance between two strings (for did-you-mean suggestions).
size_t edit_distance(const std::string& a, const std::string& b);

// " (did you mean 'x'?)" for the closest candidate, or "" when none is close.
std::string did_you_mean(const std::string& word, const std::vector<std::string>& candidates);

[[noreturn]] void internal_error(const char* file, int line, const std::string& what);

}  // namespace moeforge

#define MF_CHECK(cond, msg)                                                        \
  do {                                                                             \
    if (!(cond)) ::moeforge::internal_error(__FILE__, __LINE__, std::string(#cond) + ": " + (msg)); \
  } while (0)
