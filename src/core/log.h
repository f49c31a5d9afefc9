// Minimal logging to stderr; the CLI owns stdout for results (tables, JSON).
#pragma once
#include <iostream>
#include <sstream>
#include <string>

namespace moeforge::log {

enum class Level { Debug = 0, Info = 1, Warn = 2, Error = 3 };
Level level();
void set_level(Level l);
void write(Level l, const std::string& msg);

}  // namespace moeforge::log

#define MF_LOG(lvl, expr)                                                   \
  do {                                                                      \
    if (::moeforge::log::Level::lvl >= ::moeforge::log::level()) {          \
      std::ostringstream mf_log_os_;                                        \
      mf_log_os_ << expr;                                                   \
      ::moeforge::log::write(::moeforge::log::Level::lvl, mf_log_os_.str()); \
    }                                                                       \
  } while (0)
#define MF_INFO(expr) MF_LOG(Info, expr)
#define MF_WARN(expr) MF_LOG(Warn, expr)
#define MF_DEBUG(expr) MF_LOG(Debug, expr)
