// Chat formatting for supervised fine-tuning: the Mixtral-Instruct ("mistral") template and the
// three JSONL example shapes people have. Loss masks mark the tokens a model is trained to produce.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "data/tokenizer.h"

namespace moeforge::data {

// An example that cannot be used but harms nothing else (a missing field, an empty completion, a
// prompt over the length limit): data loaders skip it and count it; elsewhere it is a UserError.
class BadExample : public UserError {
 public:
  BadExample(std::string why, const std::string& msg) : UserError(msg), reason(std::move(why)) {}
  std::string reason;  // "missing field" | "empty completion" | "prompt over the limit" | ...
};

// Skipped examples by reason, and the first one's message (file:line: ...), for the log and summary.
struct SkipCounts {
  std::map<std::string, int64_t> by_reason;
  std::string first;
  void add(const std::string& reason, const std::string& message);
  int64_t total() const;
  std::string describe() const;  // "2 missing field, 1 empty completion (first: f.jsonl:3: ...)" or "none"
};

struct Message {
  std::string role;  // system | user | assistant
  std::string content;
};

// The string Mixtral-8x7B-Instruct's Hugging Face template renders (with "<s>"/"</s>" spelled out):
//   <s>[INST] {system}\n\n{user} [/INST]{assistant}</s>[INST] {user} [/INST]{assistant}</s>...
// An optional system message first, then user/assistant alternating, starting with user.
// A violation is a UserError naming `where` (e.g. "file.jsonl:12").
std::string render_mistral(const std::vector<Message>& messages, const std::string& where);

struct TokenizedExample {
  std::vector<int> ids;
  std::vector<uint8_t> loss_mask;  // 1 where the token is a training target (assistant text and its </s>)
};

// Tokens of the rendered conversation with <s>/</s> as special ids (never as text). With
// `train_on_all`, every token but the first is a target.
TokenizedExample tokenize_chat(const Tokenizer& tok, const std::vector<Message>& messages, bool train_on_all,
                               const std::string& where);

// One JSONL example in any of the three shapes -> messages:
//   {"messages": [{"role", "content"}, ...]}, {"prompt", "completion"}, {"text"} (a single assistant-less
//   document: returned as one user message with `is_plain_text` set).
std::vector<Message> example_messages(const nlohmann::json& j, const std::string& where, bool* is_plain_text);

}  // namespace moeforge::data
