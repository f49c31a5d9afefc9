#include "data/sft_dataset.h"

#include <ATen/ATen.h>


#include "core/error.h"
#include "io/jsonl.h"

namespace moeforge::data {

std::vector<TokenizedExample> load_sft_examples(const std::string& path, const Tokenizer& tok, const SftOptions& opt,
                                                SftStats* stats) {
  if (opt.overlong != "truncate" && opt.overlong != "skip") throw UserError("sft: overlong must be truncate or skip");
  std::vector<TokenizedExample> out;
  SftStats st;
  io::for_each_jsonl(path, [&](const nlohmann::json& j, const std::string& where) {
    ++st.examples;
    TokenizedExample ex;
    try {
      bool plain = false;
      auto messages = example_messages(j, where, &plain);
      if (plain) {  // a plain document: every token is a target
        ex.ids.push_back(tok.bos_id());
        for (int t : tok.encode(messages[0].content)) ex.ids.push_back(t);
        ex.ids.push_back(tok.eos_id());
        ex.loss_mask.assign(ex.ids.size(), 1);
        ex.loss_mask[0] = 0;
      } else {
        ex = tokenize_chat(tok, messages, opt.train_on_all, where);
      }
    } catch (const BadExample& e) {
      ++st.skipped;
      st.skips.add(e.reason, e.what());
      return;
    }
    if (static_cast<int64_t>(ex.ids.size()) > opt.max_len + 1) {
      if (opt.overlong == "skip") {
        ++st.skipped;
        st.skips.add("over the limit", where + ": " + std::to_string(ex.ids.size()) + " tokens, limit " +
                                           std::to_string(opt.max_len + 1));
        return;
      }
      ++st.truncated;
      ex.ids.resize(static_cast<size_t>(opt.max_len + 1));
      ex.loss_mask.resize(ex.ids.size());
    }
    int64_t targets = 0;
    for (size_t i = 1; i < ex.loss_mask.size(); ++i) targets += ex.loss_mask[i];
    if (targets == 0) {  // e.g. the prompt alone filled the limit
      ++st.skipped;
      st.skips.add("prompt over the limit", where + ": no completion token within " + std::to_string(opt.max_len + 1) +
                                                  " tokens");
      return;
    }
    st.target_tokens += targets;
    out.push_back(std::move(ex));
  });
  if (stats) *stats = st;
  if (out.empty()) throw UserError(path + ": no usable examples (" + std::to_string(st.examples) + " read, skipped: " +
                                   st.skips.describe() + ")");
  return out;
}

std::vector<std::vector<size_t>> pack_rows(const std::vector<TokenizedExample>& ex, int64_t seq_len) {
  std::vector<std::vector<size_t>> rows;
  int64_t used = seq_len;  // forces a first row
  for (size_t i = 0; i < ex.size(); ++i) {
    const int64_t n = static_cast<int64_t>(ex[i].ids.size()) - 1;
    MF_CHECK(n >= 1 && n <= seq_len, "examples are truncated to the row length");
    if (used + n > seq_len) {
      rows.emplace_back();
      used = 0;
    }
    rows.back().push_back(i);
    used += n;
  }
  return rows;
}

PackedBatch make_packed_batch(const std::vector<TokenizedExample>& ex, const std::vector<std::vector<size_t>>& rows,
                              int64_t seq_len) {
  const int64_t B = static_cast<int64_t>(rows.size());
  PackedBatch b;
  b.inputs = at::zeros({B, seq_len}, at::kLong);
  b.targets = at::zeros({B, seq_len}, at::kLong);
  b.loss_mask = at::zeros({B, seq_len}, at::kFloat);
  b.position_ids = at::zeros({B, seq_len}, at::kLong);
  b.segment_ids = at::full({B, seq_len}, -1, at::kLong);
  b.valid = at::zeros({B, seq_len}, at::kFloat);
  auto va = b.valid.accessor<float, 2>();
  auto in = b.inputs.accessor<int64_t, 2>(), tg = b.targets.accessor<int64_t, 2>(),
       pos = b.position_ids.accessor<int64_t, 2>(), seg = b.segment_ids.accessor<int64_t, 2>();
  auto mk = b.loss_mask.accessor<float, 2>();
  for (int64_t r = 0; r < B; ++r) {
    int64_t col = 0, s = 0;
    for (size_t idx : rows[static_cast<size_t>(r)]) {
      const auto& e = ex[idx];
      const int64_t n = static_cast<int64_t>(e.ids.size()) - 1;
      for (int64_t t = 0; t < n; ++t, ++col) {
        in[r][col] = e.ids[t];
        tg[r][col] = e.ids[t + 1];
        mk[r][col] = e.loss_mask[t + 1];
        pos[r][col] = t;
        seg[r][col] = s;
        va[r][col] = 1.0f;
      }
      ++s;
    }
    for (; col < seq_len; ++col) seg[r][col] = s++;  // padding: each position alone, no target
  }
  return b;
}

}  // namespace moeforge::data
