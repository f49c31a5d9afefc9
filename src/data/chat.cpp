#include "data/chat.h"

#include "core/error.h"

namespace moeforge::data {

namespace {

// Splits messages into (system prefix, [(user, assistant)]) after checking the alternation.
struct Turns {
  std::string system;
  std::vector<std::pair<std::string, std::string>> pairs;
  bool ends_with_user = false;
};

Turns check_turns(const std::vector<Message>& m, const std::string& where) {
  Turns t;
  size_t i = 0;
  if (!m.empty() && m[0].role == "system") {
    t.system = m[0].content;
    i = 1;
  }
  if (i >= m.size()) throw UserError(where + ": a conversation needs at least one user message");
  for (size_t k = i; k < m.size(); ++k) {
    const std::string expect = (k - i) % 2 == 0 ? "user" : "assistant";
    if (m[k].role != expect)
      throw UserError(where + ": message " + std::to_string(k + 1) + " has role '" + m[k].role + "', expected '" +
                      expect + "' (an optional system message, then user and assistant alternating)");
    if (expect == "user") t.pairs.emplace_back(m[k].content, "");
    else t.pairs.back().second = m[k].content;
  }
  t.ends_with_user = (m.size() - i) % 2 == 1;
  return t;
}

}  // namespace

void SkipCounts::add(const std::string& reason, const std::string& message) {
  if (first.empty()) first = message;
  ++by_reason[reason];
}

int64_t SkipCounts::total() const {
  int64_t n = 0;
  for (const auto& [k, v] : by_reason) n += v;
  return n;
}

std::string SkipCounts::describe() const {
  if (by_reason.empty()) return "none";
  std::string s;
  for (const auto& [k, v] : by_reason) s += (s.empty() ? "" : ", ") + std::to_string(v) + " " + k;
  return s + " (first: " + first + ")";
}

std::string render_mistral(const std::vector<Message>& messages, const std::string& where) {
  Turns t = check_turns(messages, where);
  std::string out = "<s>";
  for (size_t p = 0; p < t.pairs.size(); ++p) {
    out += "[INST] " + (p == 0 && !t.system.empty() ? t.system + "\n\n" : "") + t.pairs[p].first + " [/INST]";
    if (p + 1 < t.pairs.size() || !t.ends_with_user) out += t.pairs[p].second + "</s>";
  }
  return out;
}

TokenizedExample tokenize_chat(const Tokenizer& tok, const std::vector<Message>& messages, bool train_on_all,
                               const std::string& where) {
  Turns t = check_turns(messages, where);
  TokenizedExample ex;
  auto add = [&](const std::vector<int>& ids, uint8_t target) {
    ex.ids.insert(ex.ids.end(), ids.begin(), ids.end());
    ex.loss_mask.insert(ex.loss_mask.end(), ids.size(), target);
  };
  add({tok.bos_id()}, 0);
  for (size_t p = 0; p < t.pairs.size(); ++p) {
    add(tok.encode("[INST] " + (p == 0 && !t.system.empty() ? t.system + "\n\n" : "") + t.pairs[p].first + " [/INST]"),
        train_on_all ? 1 : 0);
    if (p + 1 == t.pairs.size() && t.ends_with_user) break;
    if (t.pairs[p].second.empty()) throw BadExample("empty completion", where + ": assistant message " + std::to_string(p + 1) + " is empty");
    auto reply = tok.encode(t.pairs[p].second);
    if (reply.empty())
      throw BadExample("empty completion", where + ": assistant message " + std::to_string(p + 1) + " has no tokens");
    add(reply, 1);
    add({tok.eos_id()}, 1);
  }
  if (train_on_all && !ex.loss_mask.empty()) ex.loss_mask[0] = 0;  // nothing predicts the first token
  return ex;
}

std::vector<Message> example_messages(const nlohmann::json& j, const std::string& where, bool* is_plain_text) {
  *is_plain_text = false;
  auto str = [&](const nlohmann::json& o, const char* key) -> std::string {
    if (!o.contains(key)) throw BadExample("missing field", where + ": missing field '" + key + "'");
    if (!o[key].is_string()) throw UserError(where + ": field '" + key + "' must be a string");
    return o[key].get<std::string>();
  };
  if (!j.is_object()) throw UserError(where + ": expected a JSON object");
  if (j.contains("messages")) {
    if (!j["messages"].is_array()) throw UserError(where + ": 'messages' must be a list");
    std::vector<Message> m;
    for (const auto& e : j["messages"]) {
      if (!e.is_object()) throw UserError(where + ": every message must be an object with 'role' and 'content'");
      m.push_back(Message{str(e, "role"), str(e, "content")});
    }
    return m;
  }
  if (j.contains("prompt") || j.contains("completion")) {
    std::string c = str(j, "completion");
    if (c.empty()) throw BadExample("empty completion", where + ": 'completion' is empty");
    return {Message{"user", str(j, "prompt")}, Message{"assistant", c}};
  }
  if (j.contains("text")) {
    *is_plain_text = true;
    return {Message{"user", str(j, "text")}};
  }
  throw UserError(where + ": expected 'messages', 'prompt' + 'completion', or 'text'");
}

}  // namespace moeforge::data
