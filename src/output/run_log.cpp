#include "output/run_log.h"

#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "model/load_balance.h"
#include "parallel/layout.h"

namespace moeforge::train {

namespace {
std::string fmt_duration(double s) {
  char buf[32];
  if (s >= 3600) std::snprintf(buf, sizeof buf, "%dh%02dm", static_cast<int>(s / 3600), static_cast<int>(s / 60) % 60);
  else std::snprintf(buf, sizeof buf, "%dm%02ds", static_cast<int>(s / 60), static_cast<int>(s) % 60);
  return buf;
}
}  // namespace

StepTotals::StepTotals(int layers)
    : loads(static_cast<size_t>(layers)), entropy(static_cast<size_t>(layers), 0.0) {}

void StepTotals::add(const BatchLoss& l, int64_t accum) {
  tokens += l.processed;
  targets += l.tokens;
  loss += l.loss / accum;
  aux += l.aux / accum;
  z += l.z / accum;
  for (const auto& [k, v] : l.metrics) metrics[k] += v / static_cast<double>(accum);
  for (size_t i = 0; i < loads.size(); ++i) {
    loads[i] = loads[i].defined() ? loads[i] + l.load_per_layer[i] : l.load_per_layer[i];
    entropy[i] += l.entropy_per_layer[i] / accum;
  }
}

void StepTotals::reduce(parallel::Layout& layout) {
  if (layout.world() == 1) return;
  const double W = layout.world();
  std::vector<double> v{loss, aux, z, static_cast<double>(tokens), static_cast<double>(targets)};
  for (double e : entropy) v.push_back(e);
  for (const auto& [k, x] : metrics) v.push_back(x);
  std::vector<torch::Tensor> buf{torch::tensor(v, torch::kDouble), torch::stack(loads).to(torch::kDouble).contiguous()};
  layout.all_reduce_sum(buf);
  auto s = buf[0].accessor<double, 1>();
  loss = s[0] / W;
  aux = s[1] / W;
  z = s[2] / W;
  tokens = static_cast<int64_t>(s[3]);
  targets = static_cast<int64_t>(s[4]);
  const auto L = static_cast<int64_t>(entropy.size());
  for (int64_t i = 0; i < L; ++i) entropy[static_cast<size_t>(i)] = s[5 + i] / W;
  int64_t k = 5 + L;
  for (auto& [name, x] : metrics) x = s[k++] / W;
  for (int64_t i = 0; i < L; ++i) loads[static_cast<size_t>(i)] = buf[1][i].to(torch::kLong);
}

RunLog::RunLog(std::unique_ptr<MetricsLog> metrics, bool main_rank, int64_t total_steps, double flops_per_token,
               double peak_gflops)
    : metrics_(std::move(metrics)),
      main_(main_rank),
      total_steps_(total_steps),
      flops_per_token_(flops_per_token),
      peak_gflops_(peak_gflops) {}

void RunLog::train(const TrainerState& state, const StepTotals& s, double total_loss, double lr, double grad_norm,
                   double tps, double eta) {
  nlohmann::json rec = {{"step", state.step}, {"loss", s.loss}, {"aux_loss", s.aux}, {"z_loss", s.z},
                        {"total_loss", total_loss}, {"lr", lr}, {"grad_norm", grad_norm}, {"tokens_per_second", tps},
                        {"tokens", state.tokens_seen}, {"tokens_trained", state.target_tokens_seen},
                        {"mfu", flops_per_token_ * tps / (peak_gflops_ * 1e9)}};
  nlohmann::json load_json = nlohmann::json::array(), maxmean = nlohmann::json::array(), cv = nlohmann::json::array(),
                 ent = nlohmann::json::array();
  double worst = 0;
  for (size_t i = 0; i < s.loads.size(); ++i) {
    auto li = s.loads[i].to(torch::kLong);
    std::vector<int64_t> v(li.data_ptr<int64_t>(), li.data_ptr<int64_t>() + li.numel());
    const BalanceStats b = balance_stats(v);
    load_json.push_back(v);
    maxmean.push_back(b.max_over_mean);
    worst = std::max(worst, b.max_over_mean);
    cv.push_back(b.cv);
    ent.push_back(s.entropy[i]);
  }
  rec["load_max_over_mean"] = worst;
  for (const auto& [k, v] : s.metrics) rec[k] = v;
  nlohmann::json full = rec;
  full["expert_load"] = load_json;
  full["layer_load_max_over_mean"] = maxmean;
  full["layer_load_cv"] = cv;
  full["layer_router_entropy"] = ent;
  if (metrics_) metrics_->write(full, "train/");
  if (main_)
    std::fprintf(stderr,
                 "step %6ld/%ld | loss %.4f | aux %.3f | z %.3f | lr %.2e | gnorm %.3f | %.0f tok/s | "
                 "max/mean load %.2f | ETA %s\n",
                 (long)state.step, (long)total_steps_, s.loss, s.aux, s.z, lr, grad_norm, tps, worst,
                 fmt_duration(eta).c_str());
}

void RunLog::eval(int64_t step, const EvalResult& ev) {
  nlohmann::json rec = {{"step", step}, {"val_loss", ev.loss}, {"val_tokens", ev.tokens}};
  if (!std::isnan(ev.perplexity)) rec["val_perplexity"] = ev.perplexity;
  std::string extra;
  for (const auto& [k, v] : ev.metrics) {
    rec["val_" + k] = v;
    if (k == "rewards/accuracies" || k == "rewards/margins") extra += " | " + k + " " + std::to_string(v).substr(0, 6);
  }
  if (metrics_) metrics_->write(rec, "val/");
  if (!main_) return;
  if (std::isnan(ev.perplexity))  // a loss that is not a likelihood (DPO) has no perplexity
    std::fprintf(stderr, "step %6ld/%ld | val loss %.4f%s\n", (long)step, (long)total_steps_, ev.loss, extra.c_str());
  else
    std::fprintf(stderr, "step %6ld/%ld | val loss %.4f | val ppl %.2f (%ld tokens)\n", (long)step, (long)total_steps_,
                 ev.loss, ev.perplexity, (long)ev.tokens);
}

}  // namespace moeforge::train
