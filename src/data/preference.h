// Preference pairs for DPO: JSONL {"prompt", "chosen", "rejected"}, each a string or a message list
// (TRL's two formats). A sequence is prompt + completion in the chat format; its loss mask covers the
// completion's tokens only (the tokens whose log-probs DPO sums).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "data/chat.h"
#include "data/tokenizer.h"

namespace moeforge::data {

struct PreferencePair {
  TokenizedExample chosen, rejected;
};

struct PreferenceStats {
  int64_t pairs_read = 0, truncated = 0;
  SkipCounts skips;  // missing field, empty completion, prompt over the limit
};

// `max_len`: predictions per sequence (the recipe's seq_len). A completion that does not fit is cut
// (counted as truncated); a prompt that leaves no room for a completion token skips the pair. A line
// that is not JSON, or a prompt/completion of the wrong type or role order, is a UserError naming
// file:line; it is an error too when no pair is left.
std::vector<PreferencePair> load_preference_pairs(const std::string& path, const Tokenizer& tok, int64_t max_len,
                                                  PreferenceStats* stats);

// Messages of one side of a pair: the prompt (a string is one user message) followed by the completion
// (a string is one assistant message; a list is appended as it is and must end with the assistant).
std::vector<Message> preference_messages(const nlohmann::json& pair, const std::string& side, const std::string& where);

}  // namespace moeforge::data
