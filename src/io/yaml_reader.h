// Strict reading of YAML maps: every key is declared with its type and default;
// an unknown key (with a did-you-mean), a wrong type or an impossible value is a
// UserError naming the file, line and dotted key.
#pragma once
#include <yaml-cpp/yaml.h>

#include <cstdint>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace moeforge::io {

// Loads a YAML file; a missing file or a syntax error is a UserError naming the file (and line).
YAML::Node load_yaml_file(const std::string& path);

// Applies an override "a.b.c=value" (value parsed as YAML) to a document.
void apply_override(YAML::Node& root, const std::string& assignment);

class YamlMap {
 public:
  // `prefix` is the dotted path of this map inside the document ("" at the root, "moe." below).
  YamlMap(const YAML::Node& node, std::string file, std::string prefix = "");

  int64_t get_int(const std::string& key, std::optional<int64_t> dflt = std::nullopt);
  // Integer or null; absent gives `dflt`.
  std::optional<int64_t> get_optional_int(const std::string& key, std::optional<int64_t> dflt);
  double get_double(const std::string& key, std::optional<double> dflt = std::nullopt);
  // Absent: dflt; null: nullopt.
  std::optional<double> get_optional_double(const std::string& key, std::optional<double> dflt);
  bool get_bool(const std::string& key, std::optional<bool> dflt = std::nullopt);
  std::string get_string(const std::string& key, std::optional<std::string> dflt = std::nullopt);
  std::string get_enum(const std::string& key, const std::vector<std::string>& allowed,
                       std::optional<std::string> dflt = std::nullopt);
  // A list of numbers; absent gives `dflt`.
  std::vector<double> get_double_list(const std::string& key, const std::vector<double>& dflt);
  // A list of strings (a single string is a list of one); absent gives `dflt`.
  std::vector<std::string> get_string_list(const std::string& key, const std::vector<std::string>& dflt);
  // A nested map; absent gives an empty map (all defaults).
  YamlMap get_map(const std::string& key);
  bool has(const std::string& key) const;
  // Marks `key` as known without reading it (a key its caller reads by other means).
  void accept(const std::string& key) { known_.push_back(key); }

  // "file:line: key 'prefix.key': what" — for checks that involve several keys.
  [[noreturn]] void fail(const std::string& key, const std::string& what) const;
  std::string where(const std::string& key) const;

  // Fails on any key that was not read (unknown key), suggesting the closest known one.
  void finish();

  const std::string& file() const { return file_; }

 private:
  YAML::Node lookup(const std::string& key);
  enum class Presence { Absent, Null, Value };
  Presence presence(const std::string& key);
  YAML::Node node_;
  std::string file_;
  std::string prefix_;
  std::vector<std::string> known_;
};

}  // namespace moeforge::io
