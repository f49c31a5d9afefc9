// Reading documents from plain text and JSONL files.
#pragma once
#include <functional>
#include <string>
#include <vector>

namespace moeforge::data {

struct Document {
  std::string text;
  std::string domain;  // metadata label (e.g. a Brown genre), "" when none
  std::string source;  // "file" or "file:line"
};

struct TextSourceOptions {
  std::string domain_field;        // JSONL: field holding the domain label ("" = none)
  bool split_blank_lines = false;  // plain text: blank-line separated documents instead of one per file
  std::string text_field = "text";
};

// Expands globs (sorted, deterministic); a pattern that matches nothing is a UserError.
std::vector<std::string> expand_inputs(const std::vector<std::string>& patterns);

// Calls `fn` for each non-empty document: a .jsonl/.json line is a document (its text_field),
// a plain text file is one document (or several, blank-line separated).
void for_each_document(const std::vector<std::string>& files, const TextSourceOptions& opt,
                       const std::function<void(const Document&)>& fn);
inline void for_each_document(const std::vector<std::string>& files, const std::string& domain_field,
                              const std::function<void(const Document&)>& fn) {
  TextSourceOptions o;
  o.domain_field = domain_field;
  for_each_document(files, o, fn);
}

}  // namespace moeforge::data
