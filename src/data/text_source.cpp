#include "data/text_source.h"

#include <glob.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"
#include "io/jsonl.h"

namespace moeforge::data {

namespace fs = std::filesystem;

std::vector<std::string> expand_inputs(const std::vector<std::string>& patterns) {
  std::vector<std::string> out;
  for (const auto& p : patterns) {
    if (p.find_first_of("*?[") == std::string::npos) {
      if (!fs::exists(p)) throw UserError(p + ": input file not found");
      if (fs::is_directory(p)) {
        std::vector<std::string> inside;
        for (auto& e : fs::directory_iterator(p))
          if (e.is_regular_file()) inside.push_back(e.path().string());
        std::sort(inside.begin(), inside.end());
        out.insert(out.end(), inside.begin(), inside.end());
      } else {
        out.push_back(p);
      }
      continue;
    }
    glob_t g{};
    int rc = ::glob(p.c_str(), 0, nullptr, &g);
    std::vector<std::string> matched;
    if (rc == 0)
      for (size_t i = 0; i < g.gl_pathc; ++i) matched.push_back(g.gl_pathv[i]);
    globfree(&g);
    if (matched.empty()) throw UserError(p + ": no input file matches");
    std::sort(matched.begin(), matched.end());
    out.insert(out.end(), matched.begin(), matched.end());
  }
  return out;
}

namespace {
bool is_jsonl(const std::string& f) {
  auto ext = fs::path(f).extension().string();
  return ext == ".jsonl" || ext == ".json";
}
}  // namespace

void for_each_document(const std::vector<std::string>& files, const TextSourceOptions& opt,
                       const std::function<void(const Document&)>& fn) {
  for (const auto& f : files) {
    if (is_jsonl(f)) {
      io::for_each_jsonl(f, [&](const nlohmann::json& j, const std::string& where) {
        if (!j.is_object() || !j.contains(opt.text_field) || !j[opt.text_field].is_string())
          throw UserError(where + ": expected an object with a string '" + opt.text_field + "' field");
        Document d;
        d.text = j[opt.text_field].get<std::string>();
        if (!opt.domain_field.empty() && j.contains(opt.domain_field)) {
          const auto& v = j[opt.domain_field];
          d.domain = v.is_string() ? v.get<std::string>() : v.dump();
        }
        d.source = where;
        if (!d.text.empty()) fn(d);
      });
      continue;
    }
    std::ifstream in(f, std::ios::binary);
    if (!in) throw UserError(f + ": cannot open");
    std::stringstream ss;
    ss << in.rdbuf();
    std::string all = ss.str();
    if (!opt.split_blank_lines) {
      if (all.find_first_not_of(" \t\r\n") != std::string::npos) fn(Document{all, "", f});
      continue;
    }
    std::string cur;
    std::istringstream lines(all);
    std::string line;
    auto emit = [&] {
      if (cur.find_first_not_of(" \t\r\n") != std::string::npos) fn(Document{cur, "", f});
      cur.clear();
    };
    while (std::getline(lines, line)) {
      if (line.find_first_not_of(" \t\r") == std::string::npos) {
        emit();
      } else {
        cur += line;
        cur += '\n';
      }
    }
    emit();
  }
}

}  // namespace moeforge::data
