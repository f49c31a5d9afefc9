#include "core/log.h"

#include <atomic>
#include <mutex>

namespace moeforge::log {
namespace {
std::atomic<int> g_level{static_cast<int>(Level::Info)};
std::mutex g_mu;
}  // namespace

Level level() { return static_cast<Level>(g_level.load()); }
void set_level(Level l) { g_level.store(static_cast<int>(l)); }

void write(Level l, const std::string& msg) {
  static const char* names[] = {"debug", "info", "warn", "error"};
  std::lock_guard<std::mutex> lock(g_mu);
  std::cerr << "[moeforge " << names[static_cast<int>(l)] << "] " << msg << "\n";
}

}  // namespace moeforge::log
