// What a training run reports: the totals of one optimizer step over its micro-batches and ranks, and the
// records and progress lines written for steps and evaluations (metrics.jsonl, TensorBoard, stderr).
#pragma once
#include <torch/types.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "objective/batch_loss.h"
#include "checkpoint/checkpoint.h"
#include "eval/evaluate.h"
#include "output/metrics.h"

namespace moeforge::parallel {
class Layout;
}

namespace moeforge::train {

// What the micro-batches of one optimizer step add up to on this rank, then over all ranks: losses and
// metrics as means, token counts and expert loads as sums.
struct StepTotals {
  double loss = 0, aux = 0, z = 0;
  int64_t tokens = 0, targets = 0;  // real tokens processed, tokens trained on
  std::vector<torch::Tensor> loads;
  std::vector<double> entropy;
  std::map<std::string, double> metrics;

  explicit StepTotals(int layers);
  // Adds micro-batch `l` of `accum` (its means weighted 1 / accum).
  void add(const BatchLoss& l, int64_t accum);
  // Over the ranks of `layout` (nothing to do for one process).
  void reduce(parallel::Layout& layout);
};

class RunLog {
 public:
  // `metrics` is null on every rank but the main one; only the main rank prints.
  RunLog(std::unique_ptr<MetricsLog> metrics, bool main_rank, int64_t total_steps, double flops_per_token,
         double peak_gflops);
  // A training step: the record with per-layer expert loads, max/mean load, CV and router entropy.
  void train(const TrainerState& state, const StepTotals& s, double total_loss, double lr, double grad_norm,
             double tokens_per_second, double eta_seconds);
  // A held-out evaluation (perplexity NaN: the loss is not a likelihood, e.g. DPO's).
  void eval(int64_t step, const EvalResult& ev);

 private:
  std::unique_ptr<MetricsLog> metrics_;
  bool main_;
  int64_t total_steps_;
  double flops_per_token_, peak_gflops_;
};

}  // namespace moeforge::train
