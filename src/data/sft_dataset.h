// Supervised fine-tuning examples: JSONL -> token ids with loss masks -> packed rows.
// A packed row holds several examples end to end; attention stays inside each example
// (segment ids) and positions restart per example, so packing changes no example's loss.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "data/chat.h"
#include "data/tokenizer.h"

namespace moeforge::data {

struct SftOptions {
  int64_t max_len = 512;       // tokens per example (and per packed row)
  bool train_on_all = false;   // loss on every token, not only the assistant's
  std::string overlong = "truncate";  // truncate | skip
};

struct SftStats {
  int64_t examples = 0, truncated = 0, skipped = 0, target_tokens = 0;
  SkipCounts skips;  // why the skipped ones were skipped
};

// Reads and tokenizes a JSONL file of examples ({"messages"}, {"prompt", "completion"} or {"text"});
// a line that is not JSON (or not an object of a known shape) is a UserError naming file:line; examples
// with a missing field or an empty completion are skipped and counted, over-long ones truncated or skipped.
std::vector<TokenizedExample> load_sft_examples(const std::string& path, const Tokenizer& tok, const SftOptions& opt,
                                                SftStats* stats);

struct PackedBatch {
  at::Tensor inputs, targets;  // [B, T] int64
  at::Tensor loss_mask;        // [B, T] float: 1 where the target counts
  at::Tensor position_ids;     // [B, T] restarting per example
  at::Tensor segment_ids;      // [B, T] one id per example in the row (padding gets its own)
  at::Tensor valid;            // [B, T] float: 1 inside an example, 0 on padding
};

// Packs examples (in the given order) into rows of `seq_len` predictions, first fit in order.
// Each example contributes len - 1 (input, target) pairs.
std::vector<std::vector<size_t>> pack_rows(const std::vector<TokenizedExample>& ex, int64_t seq_len);
PackedBatch make_packed_batch(const std::vector<TokenizedExample>& ex, const std::vector<std::vector<size_t>>& rows,
                              int64_t seq_len);

}  // namespace moeforge::data
