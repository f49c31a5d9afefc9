#include <cctype>
#include <cstdlib>
#include <stdexcept>

#include "cli/cli.h"
#include "core/error.h"

namespace moeforge::cli {

bool take_flag(Args& args, const std::string& flag) {
  for (auto it = args.begin(); it != args.end(); ++it) {
    if (*it == flag) {
      args.erase(it);
      return true;
    }
  }
  return false;
}

bool take_option(Args& args, const std::string& flag, std::string* value) {
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == flag) {
      if (i + 1 >= args.size()) throw UserError(flag + ": missing value");
      *value = args[i + 1];
      args.erase(args.begin() + i, args.begin() + i + 2);
      return true;
    }
    if (args[i].rfind(flag + "=", 0) == 0) {
      *value = args[i].substr(flag.size() + 1);
      args.erase(args.begin() + i);
      return true;
    }
  }
  return false;
}

std::vector<std::string> take_repeated(Args& args, const std::string& flag) {
  std::vector<std::string> out;
  std::string v;
  while (take_option(args, flag, &v)) out.push_back(v);
  return out;
}

void reject_unknown_flags(const Args& args, const std::string& command, const std::vector<std::string>& known,
                          bool last) {
  for (const auto& a : args) {
    if (a.size() > 1 && a[0] == '-') {
      throw UserError(command + ": unknown option '" + a + "'" + did_you_mean(a, known));
    }
  }
  if (!args_only()) return;
  const std::string& usage = command_usage(command);
  for (const auto& k : known) {
    bool found = false;  // as a whole word: --seed must not be found inside --seeds
    for (size_t at = usage.find(k); at != std::string::npos && !found; at = usage.find(k, at + 1)) {
      const char next = at + k.size() < usage.size() ? usage[at + k.size()] : ' ';
      found = !(std::isalnum(static_cast<unsigned char>(next)) || next == '-');
    }
    if (!found) throw std::logic_error(command + ": the usage text lacks " + k);
  }
  if (last) throw ArgsChecked{};
}

bool args_only() {
  const char* v = std::getenv("MOEFORGE_ARGS_ONLY");
  return v && *v && std::string(v) != "0";
}

int64_t parse_int(const std::string& flag, const std::string& v) {
  char* end = nullptr;
  long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0') throw UserError(flag + ": expected an integer, got '" + v + "'");
  return x;
}

double parse_double(const std::string& flag, const std::string& v) {
  char* end = nullptr;
  double x = std::strtod(v.c_str(), &end);
  if (v.empty() || *end != '\0') throw UserError(flag + ": expected a number, got '" + v + "'");
  return x;
}

std::string take_precision(Args& args, const std::string& command) {
  std::string p;
  if (take_option(args, "--precision", &p) && p != "fp32" && p != "bf16")
    throw UserError(command + ": --precision must be fp32 or bf16, got '" + p + "'");
  return p;
}

// Values of a multi-valued option: --input a b c (until the next --flag) and/or --input=a.
std::vector<std::string> take_list(Args& args, const std::string& flag) {
  std::vector<std::string> out;
  for (size_t i = 0; i < args.size();) {
    if (args[i] == flag) {
      size_t j = i + 1;
      while (j < args.size() && args[j].rfind("--", 0) != 0) out.push_back(args[j++]);
      args.erase(args.begin() + i, args.begin() + j);
    } else if (args[i].rfind(flag + "=", 0) == 0) {
      out.push_back(args[i].substr(flag.size() + 1));
      args.erase(args.begin() + i);
    } else {
      ++i;
    }
  }
  return out;
}

}  // namespace moeforge::cli
