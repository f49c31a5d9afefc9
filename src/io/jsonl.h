// JSON Lines input: one object per line, blank lines ignored, errors named by file:line.
#pragma once
#include <functional>
#include <nlohmann/json.hpp>
#include <string>

namespace moeforge::io {

// Calls fn(value, "FILE:LINE") for every non-blank line of `path`. A file that cannot be opened or a
// line that is not JSON is a UserError naming it.
void for_each_jsonl(const std::string& path,
                    const std::function<void(const nlohmann::json& value, const std::string& where)>& fn);

}  // namespace moeforge::io
