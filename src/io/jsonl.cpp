#include "io/jsonl.h"

#include <fstream>

#include "core/error.h"

namespace moeforge::io {

void for_each_jsonl(const std::string& path,
                    const std::function<void(const nlohmann::json& value, const std::string& where)>& fn) {
  std::ifstream in(path);
  if (!in) throw UserError(path + ": cannot open");
  int64_t lineno = 0;
  for (std::string line; std::getline(in, line);) {
    ++lineno;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = path + ":" + std::to_string(lineno);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception&) {
      throw UserError(where + ": invalid JSON");
    }
    fn(j, where);
  }
}

}  // namespace moeforge::io
