// One declaration per config key: its dotted name, type, check and help text, bound to the field of a plain
// struct that holds its default. From the declarations come strict parsing (unknown keys with a
// did-you-mean, wrong types and impossible values named by file, line and key), the YAML writer (every key,
// defaults included, in declaration order) and the key reference (`moeforge info --keys`, docs/keys.md).
#pragma once
#include <yaml-cpp/yaml.h>

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <type_traits>
#include <utility>
#include <string>
#include <vector>

#include "core/error.h"
#include "io/yaml_reader.h"

namespace moeforge::io {

// A check on a value read: the reason it is impossible, or "" when it is fine.
template <class V>
using Check = std::function<std::string(const V&)>;

std::string fmt_number(double v);
// `text` with every decimal number in it written by fmt_number ("[0.90000000000000002, 0.95]" -> "[0.9, 0.95]").
std::string shortest_numbers(const std::string& text);
inline Check<double> any_number() { return [](const double&) { return std::string(); }; }
inline Check<double> positive() {
  return [](const double& v) { return v > 0 ? std::string() : "must be positive, got " + fmt_number(v); };
}
inline Check<double> non_negative() {
  return [](const double& v) { return v >= 0 ? std::string() : "must be >= 0, got " + fmt_number(v); };
}
// lo <= v < hi ("[lo, hi)") or lo <= v <= hi ("[lo, hi]").
inline Check<double> in_range(double lo, double hi, bool hi_inclusive) {
  return [=](const double& v) {
    const bool ok = v >= lo && (hi_inclusive ? v <= hi : v < hi);
    return ok ? std::string()
              : "must be in [" + fmt_number(lo) + ", " + fmt_number(hi) + (hi_inclusive ? "]" : ")") + ", got " +
                    fmt_number(v);
  };
}

// What the key reference shows of one key.
struct KeyDoc {
  std::string name, type, default_value, help;
};

template <class T>
struct KeySpec {
  std::string name;  // dotted path inside the document ("moe.num_experts")
  std::string type;  // as the reference shows it ("int", "float or null", "aux_loss | none", ...)
  std::string help;
  // Reads the key's value from the map of its section into `out` (absent: leave the default) and checks it.
  std::function<void(YamlMap& section, const std::string& leaf, T& out)> read;
  std::function<void(YAML::Emitter& e, const T& in)> write;
  // Why the field's value in a struct (not read from YAML) is impossible, or "" (null: never).
  std::function<std::string(const T& in)> check;
};

template <class T>
class KeyTable {
 public:
  KeyTable& add(KeySpec<T> k) {
    keys_.push_back(std::move(k));
    return *this;
  }
  // What the reference shows as the last key's default, instead of its written value.
  KeyTable& shown_default(std::string text) {
    shown_defaults_[keys_.back().name] = std::move(text);
    return *this;
  }

  // An integer field (int64_t, int, ...): absent keeps the default; the check sees it as a number.
  template <class Get>
  KeyTable& integer(std::string name, Get get, Check<double> check, std::string help) {
    return add({name, "int", std::move(help),
                [get, check](YamlMap& m, const std::string& leaf, T& t) {
                  auto& f = get(t);
                  const int64_t v = m.get_int(leaf, static_cast<int64_t>(f));
                  if (auto why = check(static_cast<double>(v)); !why.empty()) m.fail(leaf, why);
                  f = static_cast<std::remove_reference_t<decltype(f)>>(v);
                },
                [get](YAML::Emitter& e, const T& t) { e << get(t); },
                [get, check](const T& t) { return check(static_cast<double>(get(t))); }});
  }
  // std::optional<int64_t>: null (or absent with no default) = unset.
  template <class Get>
  KeyTable& optional_integer(std::string name, Get get, Check<double> check, std::string help) {
    return add({name, "int or null", std::move(help),
                [get, check](YamlMap& m, const std::string& leaf, T& t) {
                  auto& f = get(t);
                  f = m.get_optional_int(leaf, f);
                  if (f)
                    if (auto why = check(static_cast<double>(*f)); !why.empty()) m.fail(leaf, why);
                },
                [get](YAML::Emitter& e, const T& t) {
                  const auto& f = get(t);
                  if (f) e << *f; else e << YAML::Null;
                },
                [get, check](const T& t) { return get(t) ? check(static_cast<double>(*get(t))) : std::string(); }});
  }
  template <class Get>
  KeyTable& number(std::string name, Get get, Check<double> check, std::string help) {
    return add({name, "float", std::move(help),
                [get, check](YamlMap& m, const std::string& leaf, T& t) {
                  auto& f = get(t);
                  f = m.get_double(leaf, f);
                  if (auto why = check(f); !why.empty()) m.fail(leaf, why);
                },
                [get](YAML::Emitter& e, const T& t) { e << get(t); },
                [get, check](const T& t) { return check(get(t)); }});
  }
  template <class Get>
  KeyTable& optional_number(std::string name, Get get, Check<double> check, std::string help) {
    return add({name, "float or null", std::move(help),
                [get, check](YamlMap& m, const std::string& leaf, T& t) {
                  auto& f = get(t);
                  f = m.get_optional_double(leaf, f);
                  if (f)
                    if (auto why = check(*f); !why.empty()) m.fail(leaf, why);
                },
                [get](YAML::Emitter& e, const T& t) {
                  const auto& f = get(t);
                  if (f) e << *f; else e << YAML::Null;
                },
                [get, check](const T& t) { return get(t) ? check(*get(t)) : std::string(); }});
  }
  template <class Get>
  KeyTable& boolean(std::string name, Get get, std::string help) {
    return add({name, "bool", std::move(help),
                [get](YamlMap& m, const std::string& leaf, T& t) {
                  auto& f = get(t);
                  f = m.get_bool(leaf, f);
                },
                [get](YAML::Emitter& e, const T& t) { e << get(t); }, nullptr});
  }
  // A string; `check` may refuse some values (e.g. empty).
  template <class Get>
  KeyTable& string(std::string name, Get get, Check<std::string> check, std::string help) {
    return add({name, "string", std::move(help),
                [get, check](YamlMap& m, const std::string& leaf, T& t) {
                  auto& f = get(t);
                  f = m.get_string(leaf, f);
                  if (check)
                    if (auto why = check(f); !why.empty()) m.fail(leaf, why);
                },
                [get](YAML::Emitter& e, const T& t) { e << get(t); },
                [get, check](const T& t) { return check ? check(get(t)) : std::string(); }});
  }
  // One of `allowed`, held as a string.
  template <class Get>
  KeyTable& choice(std::string name, Get get, std::vector<std::string> allowed, std::string help) {
    return add({name, join(allowed), std::move(help),
                [get, allowed](YamlMap& m, const std::string& leaf, T& t) {
                  auto& f = get(t);
                  f = m.get_enum(leaf, allowed, f);
                },
                [get](YAML::Emitter& e, const T& t) { e << get(t); },
                [get, allowed](const T& t) {
                  for (const auto& a : allowed)
                    if (a == get(t)) return std::string();
                  return "must be one of " + join(allowed) + ", got '" + get(t) + "'";
                }});
  }
  // One of `names`, held as the enum value of the same index in `values`.
  template <class Get, class E>
  KeyTable& enumeration(std::string name, Get get, std::vector<std::string> names, std::vector<E> values,
                        std::string help) {
    MF_CHECK(names.size() == values.size(), "one value per name");
    auto name_of = [names, values](E v) {
      for (size_t i = 0; i < values.size(); ++i)
        if (values[i] == v) return names[i];
      return std::string("?");
    };
    return add({name, join(names), std::move(help),
                [get, names, values, name_of](YamlMap& m, const std::string& leaf, T& t) {
                  auto& f = get(t);
                  const std::string s = m.get_enum(leaf, names, name_of(f));
                  for (size_t i = 0; i < names.size(); ++i)
                    if (names[i] == s) f = values[i];
                },
                [get, name_of](YAML::Emitter& e, const T& t) { e << name_of(get(t)); },
                [get, name_of](const T& t) {
                  return name_of(get(t)) == "?" ? std::string("not one of the allowed values") : std::string();
                }});
  }

  // Reads every declared key below `m` (sections as nested maps), then refuses keys nobody declared.
  void parse(YamlMap& m, T& out) const {
    parse_level(m, "", out);
    m.finish();
  }
  // The whole struct as a YAML mapping in declaration order (every key, defaults included).
  void emit(YAML::Emitter& e, const T& in) const {
    e << YAML::BeginMap;
    std::vector<std::string> open;  // sections currently open
    for (const auto& k : keys_) {
      auto parts = split(k.name);
      const std::string leaf = parts.back();
      parts.pop_back();
      size_t common = 0;
      while (common < open.size() && common < parts.size() && open[common] == parts[common]) ++common;
      for (size_t i = open.size(); i > common; --i) e << YAML::EndMap;
      open.resize(common);
      for (size_t i = common; i < parts.size(); ++i) {
        e << YAML::Key << parts[i] << YAML::Value << YAML::BeginMap;
        open.push_back(parts[i]);
      }
      e << YAML::Key << leaf << YAML::Value;
      k.write(e, in);
    }
    for (size_t i = 0; i < open.size(); ++i) e << YAML::EndMap;
    e << YAML::EndMap;
  }
  std::string emit(const T& in) const {
    YAML::Emitter e;
    emit(e, in);
    return std::string(e.c_str()) + "\n";
  }
  // Name, type, default (as YAML writes it) and help of every key, `prefix` before each name.
  std::vector<KeyDoc> reference(const T& defaults, const std::string& prefix = "") const {
    std::vector<KeyDoc> docs;
    for (const auto& k : keys_) {
      YAML::Emitter e;
      e << YAML::Flow;
      k.write(e, defaults);
      const auto shown = shown_defaults_.find(k.name);
      // Floats in their shortest round-trip form (0.1, not YAML's 0.10000000000000001); the files moeforge writes
      // keep the emitter's form, so run directories and the DPO reference fingerprint are unchanged.
      const std::string d = shown != shown_defaults_.end() ? shown->second
                            : k.type.find("float") != std::string::npos ? shortest_numbers(e.c_str())
                                                                         : std::string(e.c_str());
      docs.push_back({prefix + k.name, k.type, d == "~" ? "null" : d, k.help});
    }
    return docs;
  }
  // The first key whose value in `in` its check refuses: {name, why}; nullopt when all are fine.
  std::optional<std::pair<std::string, std::string>> first_problem(const T& in) const {
    for (const auto& k : keys_)
      if (k.check)
        if (auto why = k.check(in); !why.empty()) return std::make_pair(k.name, why);
    return std::nullopt;
  }
  const std::vector<KeySpec<T>>& keys() const { return keys_; }

 private:
  static std::vector<std::string> split(const std::string& name) {
    std::vector<std::string> parts;
    size_t a = 0;
    for (size_t b; (b = name.find('.', a)) != std::string::npos; a = b + 1) parts.push_back(name.substr(a, b - a));
    parts.push_back(name.substr(a));
    return parts;
  }
  static std::string join(const std::vector<std::string>& v) {
    std::string s;
    for (const auto& x : v) s += (s.empty() ? "" : " | ") + x;
    return s;
  }
  // Keys directly under `prefix` in declaration order; a section is read (and finished) where its first
  // key is declared.
  void parse_level(YamlMap& m, const std::string& prefix, T& out) const {
    std::vector<std::string> done;
    for (const auto& k : keys_) {
      if (k.name.compare(0, prefix.size(), prefix) != 0) continue;
      const std::string rest = k.name.substr(prefix.size());
      const auto dot = rest.find('.');
      if (dot == std::string::npos) {
        if (k.read) k.read(m, rest, out);
        continue;
      }
      const std::string section = rest.substr(0, dot);
      bool seen = false;
      for (const auto& d : done) seen = seen || d == section;
      if (seen) continue;
      done.push_back(section);
      YamlMap sub = m.get_map(section);
      parse_level(sub, prefix + section + ".", out);
      sub.finish();
    }
  }

  std::vector<KeySpec<T>> keys_;
  std::map<std::string, std::string> shown_defaults_;
};

}  // namespace moeforge::io
