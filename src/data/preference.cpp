#include "data/preference.h"

#include "core/error.h"
#include "io/jsonl.h"

namespace moeforge::data {

namespace {

std::vector<Message> as_messages(const nlohmann::json& v, const std::string& field, const std::string& role,
                                 const std::string& where) {
  if (v.is_string()) return {Message{role, v.get<std::string>()}};
  if (!v.is_array())
    throw UserError(where + ": field '" + field + "' must be a string or a list of {role, content} messages");
  std::vector<Message> m;
  for (const auto& e : v) {
    if (!e.is_object() || !e.contains("role") || !e.contains("content") || !e["role"].is_string() ||
        !e["content"].is_string())
      throw UserError(where + ": field '" + field + "': every message must be an object with string 'role' and 'content'");
    m.push_back(Message{e["role"].get<std::string>(), e["content"].get<std::string>()});
  }
  return m;
}

}  // namespace

std::vector<Message> preference_messages(const nlohmann::json& j, const std::string& side, const std::string& where) {
  if (!j.is_object()) throw UserError(where + ": expected a JSON object with 'prompt', 'chosen' and 'rejected'");
  for (const char* k : {"prompt", "chosen", "rejected"})
    if (!j.contains(k)) throw BadExample("missing field", where + ": missing field '" + k + "'");
  auto m = as_messages(j["prompt"], "prompt", "user", where);
  if (m.empty() || m.back().role != "user")
    throw UserError(where + ": field 'prompt' must end with a user message");
  auto c = as_messages(j[side], side, "assistant", where);
  if (c.empty() || c.back().role != "assistant")
    throw UserError(where + ": field '" + side + "' must end with an assistant message");
  if (c.back().content.empty()) throw BadExample("empty completion", where + ": '" + side + "' is empty");
  m.insert(m.end(), c.begin(), c.end());
  return m;
}

std::vector<PreferencePair> load_preference_pairs(const std::string& path, const Tokenizer& tok, int64_t max_len,
                                                  PreferenceStats* stats) {
  PreferenceStats st;
  std::vector<PreferencePair> out;
  io::for_each_jsonl(path, [&](const nlohmann::json& j, const std::string& where) {
    ++st.pairs_read;
    PreferencePair p;
    bool cut = false;
    try {
      auto prompt = preference_messages(j, "chosen", where);
      // The prompt's tokens: everything before the completion's messages.
      const size_t n_completion = j["chosen"].is_array() ? j["chosen"].size() : 1;
      prompt.resize(prompt.size() - n_completion);
      const size_t prompt_len = tokenize_chat(tok, prompt, false, where).ids.size();
      if (static_cast<int64_t>(prompt_len) >= max_len + 1)
        throw BadExample("prompt over the limit", where + ": the prompt has " + std::to_string(prompt_len) +
                                                      " tokens, no room for a completion within " +
                                                      std::to_string(max_len + 1));
      for (const char* side : {"chosen", "rejected"}) {
        TokenizedExample ex = tokenize_chat(tok, preference_messages(j, side, where), false, where);
        MF_CHECK(ex.ids.size() > prompt_len, "a completion adds tokens");
        std::fill(ex.loss_mask.begin(), ex.loss_mask.begin() + static_cast<long>(prompt_len), 0);
        if (static_cast<int64_t>(ex.ids.size()) > max_len + 1) {
          ex.ids.resize(static_cast<size_t>(max_len + 1));
          ex.loss_mask.resize(ex.ids.size());
          cut = true;
        }
        (side[0] == 'c' ? p.chosen : p.rejected) = std::move(ex);
      }
    } catch (const BadExample& e) {
      st.skips.add(e.reason, e.what());
      return;
    }
    if (cut) ++st.truncated;
    out.push_back(std::move(p));
  });
  if (stats) *stats = st;
  if (out.empty())
    throw UserError(path + ": no usable preference pairs (" + std::to_string(st.pairs_read) + " read, skipped: " +
                    st.skips.describe() + ")");
  return out;
}

}  // namespace moeforge::data
