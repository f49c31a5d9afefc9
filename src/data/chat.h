// Chat formatting for supervised fine-tuning: the Mixtral-Instruct ("mistral") template and the
// three JSONL example shapes people have. Loss masks mark the tokens a model is trained to produce.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "data/tokenizer.h"

namespace moeforge::data {

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
