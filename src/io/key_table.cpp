#include "io/key_table.h"

#include <cstdio>
#include <cstdlib>

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

}  // namespace moeforge::io
