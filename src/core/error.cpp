#include "core/error.h"

#include <algorithm>
#include <sstream>

namespace moeforge {

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t sub = prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1);
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, sub});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

std::string did_you_mean(const std::string& word, const std::vector<std::string>& candidates) {
  std::string best;
  size_t best_d = std::string::npos;
  for (const auto& c : candidates) {
    size_t d = edit_distance(word, c);
    if (d < best_d) {
      best_d = d;
      best = c;
    }
  }
  // Close enough: at most a third of the word's letters wrong (and at least 2 allowed),
  // or the word is a prefix/suffix fragment of the candidate.
  size_t limit = std::max<size_t>(2, word.size() / 3);
  if (!best.empty() && (best_d <= limit || (word.size() >= 4 && best.find(word) != std::string::npos)))
    return " (did you mean '" + best + "'?)";
  return "";
}

void internal_error(const char* file, int line, const std::string& what) {
  std::ostringstream os;
  os << "internal error at " << file << ":" << line << ": " << what;
  throw std::logic_error(os.str());
}

}  // namespace moeforge
