#include "io/yaml_reader.h"

#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>

#include "core/error.h"

namespace moeforge::io {

YAML::Node load_yaml_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw UserError(path + ": cannot open: " + std::strerror(errno));
  std::stringstream ss;
  ss << in.rdbuf();
  try {
    YAML::Node n = YAML::Load(ss.str());
    if (n.IsNull()) return YAML::Node(YAML::NodeType::Map);
    if (!n.IsMap()) throw UserError(path + ": expected a YAML mapping at the top level");
    return n;
  } catch (const YAML::Exception& e) {
    throw UserError(path + ":" + std::to_string(e.mark.line + 1) + ": YAML syntax error: " + e.msg);
  }
}

void apply_override(YAML::Node& root, const std::string& assignment) {
  auto eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0)
    throw UserError("--set '" + assignment + "': expected key.path=value");
  std::string path = assignment.substr(0, eq);
  std::string value = assignment.substr(eq + 1);
  YAML::Node parsed;
  try {
    parsed = YAML::Load(value);
  } catch (const YAML::Exception& e) {
    throw UserError("--set '" + assignment + "': cannot parse value: " + e.msg);
  }
  std::vector<std::string> parts;
  std::stringstream ps(path);
  for (std::string p; std::getline(ps, p, '.');) {
    if (p.empty()) throw UserError("--set '" + assignment + "': empty key in path");
    parts.push_back(p);
  }
  // yaml-cpp nodes are handles: walk with fresh handles (reset), never assign through them.
  std::vector<YAML::Node> chain{root};
  for (size_t i = 0; i + 1 < parts.size(); ++i) {
    YAML::Node cur = chain.back();
    if (!cur[parts[i]] || !cur[parts[i]].IsMap()) cur[parts[i]] = YAML::Node(YAML::NodeType::Map);
    YAML::Node next;
    next.reset(cur[parts[i]]);
    chain.push_back(next);
  }
  chain.back()[parts.back()] = parsed;
}

YamlMap::YamlMap(const YAML::Node& node, std::string file, std::string prefix)
    : node_(node), file_(std::move(file)), prefix_(std::move(prefix)) {
  if (node_ && !node_.IsNull() && !node_.IsMap()) {
    std::string key = prefix_.empty() ? "" : prefix_.substr(0, prefix_.size() - 1);
    throw UserError(file_ + ":" + std::to_string(node_.Mark().line + 1) + ": key '" + key +
                    "': expected a mapping");
  }
}

std::string YamlMap::where(const std::string& key) const {
  int line = -1;
  if (node_ && node_.IsMap()) {
    for (auto it = node_.begin(); it != node_.end(); ++it) {
      if (it->first.as<std::string>() == key) line = it->first.Mark().line + 1;
    }
    if (line < 0 && node_.Mark().line >= 0) line = node_.Mark().line + 1;
  }
  return file_ + (line > 0 ? ":" + std::to_string(line) : std::string()) + ": key '" + prefix_ + key + "'";
}

void YamlMap::fail(const std::string& key, const std::string& what) const {
  throw UserError(where(key) + ": " + what);
}

bool YamlMap::has(const std::string& key) const {
  return node_ && node_.IsMap() && node_[key] && !node_[key].IsNull();
}

YAML::Node YamlMap::lookup(const std::string& key) {
  known_.push_back(key);
  if (!node_ || !node_.IsMap()) return YAML::Node();
  return node_[key];
}

static std::string scalar_text(const YAML::Node& n) {
  if (n.IsScalar()) return "'" + n.Scalar() + "'";
  if (n.IsSequence()) return "a list";
  if (n.IsMap()) return "a mapping";
  return "null";
}

int64_t YamlMap::get_int(const std::string& key, std::optional<int64_t> dflt) {
  YAML::Node n = lookup(key);
  if (!n || n.IsNull()) {
    if (dflt) return *dflt;
    fail(key, "required integer is missing");
  }
  if (n.IsScalar()) {
    const std::string& s = n.Scalar();
    errno = 0;
    char* end = nullptr;
    long long v = std::strtoll(s.c_str(), &end, 10);
    if (!s.empty() && end && *end == '\0' && errno == 0) return v;
    // Accept integral floats written as 1e6 or 4096.0.
    char* fend = nullptr;
    double d = std::strtod(s.c_str(), &fend);
    if (!s.empty() && fend && *fend == '\0' && std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9e18)
      return static_cast<int64_t>(d);
  }
  fail(key, "expected an integer, got " + scalar_text(n));
}

// Whether `key` is absent, null or has a value; absent and null keys are marked known here, a value is
// marked by the typed getter that reads it.
YamlMap::Presence YamlMap::presence(const std::string& key) {
  YAML::Node n = lookup(key);
  known_.pop_back();
  if (n && !n.IsNull()) return Presence::Value;
  known_.push_back(key);
  return n ? Presence::Null : Presence::Absent;
}

std::optional<int64_t> YamlMap::get_optional_int(const std::string& key, std::optional<int64_t> dflt) {
  switch (presence(key)) {
    case Presence::Absent: return dflt;
    case Presence::Null: return std::nullopt;
    default: return get_int(key);
  }
}

std::optional<double> YamlMap::get_optional_double(const std::string& key, std::optional<double> dflt) {
  switch (presence(key)) {
    case Presence::Absent: return dflt;
    case Presence::Null: return std::nullopt;
    default: return get_double(key);
  }
}

double YamlMap::get_double(const std::string& key, std::optional<double> dflt) {
  YAML::Node n = lookup(key);
  if (!n || n.IsNull()) {
    if (dflt) return *dflt;
    fail(key, "required number is missing");
  }
  if (n.IsScalar()) {
    const std::string& s = n.Scalar();
    char* end = nullptr;
    double d = std::strtod(s.c_str(), &end);
    if (!s.empty() && end && *end == '\0' && std::isfinite(d)) return d;
  }
  fail(key, "expected a number, got " + scalar_text(n));
}

bool YamlMap::get_bool(const std::string& key, std::optional<bool> dflt) {
  YAML::Node n = lookup(key);
  if (!n || n.IsNull()) {
    if (dflt) return *dflt;
    fail(key, "required boolean is missing");
  }
  if (n.IsScalar()) {
    const std::string& s = n.Scalar();
    if (s == "true" || s == "True" || s == "TRUE") return true;
    if (s == "false" || s == "False" || s == "FALSE") return false;
  }
  fail(key, "expected true or false, got " + scalar_text(n));
}

std::string YamlMap::get_string(const std::string& key, std::optional<std::string> dflt) {
  YAML::Node n = lookup(key);
  if (!n || n.IsNull()) {
    if (dflt) return *dflt;
    fail(key, "required string is missing");
  }
  if (!n.IsScalar()) fail(key, "expected a string, got " + scalar_text(n));
  return n.Scalar();
}

std::string YamlMap::get_enum(const std::string& key, const std::vector<std::string>& allowed,
                              std::optional<std::string> dflt) {
  std::string v = get_string(key, dflt);
  for (const auto& a : allowed)
    if (a == v) return v;
  std::string list;
  for (const auto& a : allowed) list += (list.empty() ? "" : " | ") + a;
  fail(key, "must be one of " + list + ", got '" + v + "'" + did_you_mean(v, allowed));
}

std::vector<double> YamlMap::get_double_list(const std::string& key, const std::vector<double>& dflt) {
  YAML::Node n = lookup(key);
  if (!n || n.IsNull()) return dflt;
  if (!n.IsSequence()) fail(key, "expected a list of numbers, got " + scalar_text(n));
  std::vector<double> out;
  for (const auto& e : n) {
    char* end = nullptr;
    const std::string s = e.IsScalar() ? e.Scalar() : "";
    double d = std::strtod(s.c_str(), &end);
    if (s.empty() || *end != '\0' || !std::isfinite(d)) fail(key, "expected a list of numbers, got an element " + scalar_text(e));
    out.push_back(d);
  }
  return out;
}

std::vector<std::string> YamlMap::get_string_list(const std::string& key, const std::vector<std::string>& dflt) {
  YAML::Node n = lookup(key);
  if (!n || n.IsNull()) return dflt;
  if (n.IsScalar()) return {n.Scalar()};
  if (!n.IsSequence()) fail(key, "expected a list of names, got " + scalar_text(n));
  std::vector<std::string> out;
  for (const auto& e : n) {
    if (!e.IsScalar()) fail(key, "expected a list of names, got an element " + scalar_text(e));
    out.push_back(e.Scalar());
  }
  return out;
}

YamlMap YamlMap::get_map(const std::string& key) {
  YAML::Node n = lookup(key);
  if (n && !n.IsNull() && !n.IsMap()) fail(key, "expected a mapping, got " + scalar_text(n));
  return YamlMap(n ? n : YAML::Node(), file_, prefix_ + key + ".");
}

void YamlMap::finish() {
  if (!node_ || !node_.IsMap()) return;
  std::set<std::string> known(known_.begin(), known_.end());
  for (auto it = node_.begin(); it != node_.end(); ++it) {
    std::string k = it->first.as<std::string>();
    if (!known.count(k)) {
      const YAML::Mark mark = it->first.Mark();
      throw UserError((mark.is_null() ? file_ + " (via --set)" : file_ + ":" + std::to_string(mark.line + 1)) +
                      ": unknown key '" + prefix_ + k +
                      "'" + did_you_mean(k, known_));
    }
  }
}

}  // namespace moeforge::io
