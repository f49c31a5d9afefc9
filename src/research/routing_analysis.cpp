#include "research/routing_analysis.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "data/token_shard.h"
#include "model/load_balance.h"

namespace moeforge::train {

namespace {
double n_choose_k(int64_t n, int64_t k) {
  double c = 1;
  for (int64_t i = 1; i <= k; ++i) c = c * static_cast<double>(n - k + i) / static_cast<double>(i);
  return c;
}
}  // namespace

std::vector<LayerRouting> analyze_routing(const RoutingTrace& tr) {
  const int64_t E = tr.num_experts, K = tr.top_k;
  const int64_t D = static_cast<int64_t>(tr.domains.size());
  std::vector<LayerRouting> out;
  for (const auto& t : tr.topk_NK) {
    MF_CHECK(t.dim() == 2 && t.size(1) == K, "a trace row holds the k choices");
    const int64_t N = t.size(0);
    MF_CHECK(static_cast<int64_t>(tr.sequence.size()) == N && static_cast<int64_t>(tr.domain.size()) == N,
             "one sequence id and domain per token");
    auto idx = t.to(torch::kCPU).to(torch::kLong).contiguous();
    const int64_t* a = idx.data_ptr<int64_t>();
    LayerRouting L;
    L.load.assign(static_cast<size_t>(E), 0);
    std::vector<std::vector<int64_t>> by_domain(static_cast<size_t>(D), std::vector<int64_t>(static_cast<size_t>(E), 0));
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < K; ++j) {
        const int64_t e = a[n * K + j];
        MF_CHECK(e >= 0 && e < E, "expert ids inside [0, E)");
        ++L.load[static_cast<size_t>(e)];
        const int32_t d = tr.domain[static_cast<size_t>(n)];
        if (d >= 0 && d < D) ++by_domain[static_cast<size_t>(d)][static_cast<size_t>(e)];
      }
    int64_t first_same = 0, set_same = 0, overlap = 0;
    std::vector<int64_t> s0(static_cast<size_t>(K)), s1(static_cast<size_t>(K));
    for (int64_t n = 0; n + 1 < N; ++n) {
      if (tr.sequence[static_cast<size_t>(n)] != tr.sequence[static_cast<size_t>(n + 1)]) continue;
      ++L.consecutive_pairs;
      if (a[n * K] == a[(n + 1) * K]) ++first_same;
      std::copy(a + n * K, a + n * K + K, s0.begin());
      std::copy(a + (n + 1) * K, a + (n + 1) * K + K, s1.begin());
      std::sort(s0.begin(), s0.end());
      std::sort(s1.begin(), s1.end());
      if (s0 == s1) ++set_same;
      bool shared = false;
      for (int64_t x : s0) shared = shared || std::binary_search(s1.begin(), s1.end(), x);
      if (shared) ++overlap;
    }
    const double pairs = static_cast<double>(std::max<int64_t>(1, L.consecutive_pairs));
    L.first_choice_repeat_rate = L.consecutive_pairs ? first_same / pairs : 0.0;
    L.top2_set_repeat_rate = L.consecutive_pairs ? set_same / pairs : 0.0;
    L.top2_overlap_rate = L.consecutive_pairs ? overlap / pairs : 0.0;
    L.random_top2_overlap_rate = 1.0 - n_choose_k(E - K, K) / n_choose_k(E, K);
    L.random_first_choice_rate = 1.0 / static_cast<double>(E);
    L.random_top2_set_rate = 1.0 / n_choose_k(E, K);
    std::vector<int64_t> first(static_cast<size_t>(E), 0);
    for (int64_t n = 0; n < N; ++n) ++first[static_cast<size_t>(a[n * K])];
    for (auto c : first) L.independent_first_choice_rate += std::pow(static_cast<double>(c) / static_cast<double>(N), 2);
    const BalanceStats bal = balance_stats(L.load);
    L.load_cv = bal.cv;
    L.load_max_over_mean = bal.max_over_mean;
    L.dead_experts = bal.dead_experts;
    for (int64_t d = 0; d < D; ++d) {
      int64_t total = 0;
      for (auto c : by_domain[static_cast<size_t>(d)]) total += c;
      if (total == 0) continue;
      std::vector<double> share;
      for (auto c : by_domain[static_cast<size_t>(d)]) share.push_back(static_cast<double>(c) / static_cast<double>(total));
      L.expert_share_by_domain[tr.domains[static_cast<size_t>(d)]] = share;
    }
    out.push_back(std::move(L));
  }
  return out;
}

RoutingTrace trace_routing(MixtralForCausalLM& model, const std::string& data_dir, const std::string& split,
                           int64_t seq_len, int64_t max_tokens) {
  data::TokenDataset ds(data_dir, split);
  const auto& meta = ds.meta();
  if (meta.vocab_size > model->config().vocab_size)
    throw UserError(data_dir + ": prepared with " + std::to_string(meta.vocab_size) + " pieces; the model has " +
                    std::to_string(model->config().vocab_size));
  RoutingTrace tr;
  tr.num_experts = model->config().moe.num_experts;
  tr.top_k = model->config().moe.num_experts_per_tok;
  tr.domains = meta.domains;
  if (tr.domains.empty()) tr.domains.push_back("all");
  const int64_t L = model->config().num_layers;
  std::vector<std::vector<at::Tensor>> parts(static_cast<size_t>(L));
  EvalModeGuard mg(model);
  torch::NoGradGuard ng;
  int64_t seq = 0, total = 0;
  std::vector<int64_t> buf;
  for (size_t s = 0; s < ds.num_shards() && total < max_tokens; ++s) {
    const auto& sh = ds.shard(s);
    for (uint64_t d = 0; d < sh.num_docs() && total < max_tokens; ++d) {
      const int32_t dom = meta.domains.empty() ? 0 : static_cast<int32_t>(sh.doc_domain(d));
      buf.assign(1, meta.bos_id);
      const uint64_t len = sh.doc_length(d);
      buf.resize(1 + len);
      sh.copy_tokens(sh.doc_begin(d), len, buf.data() + 1);
      for (size_t off = 0; off < buf.size() && total < max_tokens; off += static_cast<size_t>(seq_len)) {
        const int64_t n = std::min<int64_t>({seq_len, static_cast<int64_t>(buf.size() - off), max_tokens - total});
        if (n < 2) break;  // a pair needs two tokens
        auto ids = torch::from_blob(buf.data() + off, {1, n}, torch::kLong).to(model->lm_head_weight().device());
        auto fo = model->forward(ids);
        for (int64_t l = 0; l < L; ++l) parts[static_cast<size_t>(l)].push_back(fo.router[static_cast<size_t>(l)].topk_idx_NK.cpu());
        tr.sequence.insert(tr.sequence.end(), static_cast<size_t>(n), seq++);
        tr.domain.insert(tr.domain.end(), static_cast<size_t>(n), dom);
        total += n;
      }
    }
  }
  if (total == 0) throw UserError(data_dir + ": split '" + split + "' has no tokens to route");
  for (int64_t l = 0; l < L; ++l) tr.topk_NK.push_back(torch::cat(parts[static_cast<size_t>(l)], 0));
  return tr;
}

nlohmann::json routing_json(const RoutingTrace& tr, const std::vector<LayerRouting>& layers) {
  nlohmann::json j = {{"tokens", tr.sequence.size()}, {"num_experts", tr.num_experts}, {"top_k", tr.top_k},
                      {"domains", tr.domains}};
  j["layers"] = nlohmann::json::array();
  for (size_t i = 0; i < layers.size(); ++i) {
    const auto& L = layers[i];
    j["layers"].push_back({{"layer", i},
                           {"consecutive_pairs", L.consecutive_pairs},
                           {"first_choice_repeat_rate", L.first_choice_repeat_rate},
                           {"top2_set_repeat_rate", L.top2_set_repeat_rate},
                           {"random_first_choice_rate", L.random_first_choice_rate},
                           {"random_top2_set_rate", L.random_top2_set_rate},
                           {"independent_first_choice_rate", L.independent_first_choice_rate},
                           {"top2_overlap_rate", L.top2_overlap_rate},
                           {"random_top2_overlap_rate", L.random_top2_overlap_rate},
                           {"load", L.load},
                           {"load_cv", L.load_cv},
                           {"load_max_over_mean", L.load_max_over_mean},
                           {"dead_experts", L.dead_experts},
                           {"expert_share_by_domain", L.expert_share_by_domain}});
  }
  return j;
}

}  // namespace moeforge::train
