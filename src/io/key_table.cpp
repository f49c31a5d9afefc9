#include "io/key_table.h"

#include <cstdio>
#include <cstdlib>
#include <regex>

namespace moeforge::io {

std::string fmt_number(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  // the shortest form that reads back exactly
  for (int prec = 1; prec <= 17; ++prec) {
    char b[64];
    std::snprintf(b, sizeof b, "%.*g", prec, v);
    if (std::strtod(b, nullptr) == v) return b;
  }
  return buf;
}

std::string shortest_numbers(const std::string& text) {
  static const std::regex number(R"([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)");
  std::string out;
  auto at = text.cbegin();
  for (std::sregex_iterator it(text.begin(), text.end(), number), end; it != end; ++it) {
    out.append(at, text.cbegin() + it->position());
    out += fmt_number(std::strtod(it->str().c_str(), nullptr));
    at = text.cbegin() + it->position() + it->length();
  }
  return out.append(at, text.cend());
}

}  // namespace moeforge::io
