// The MoE terms of every objective (pretraining, SFT, DPO) in one place: the load-balancing loss and the
// router z-loss pooled over all layers (real tokens only), added when switched on, and the router
// statistics a micro-batch reports to the training loop.
#pragma once
#include <torch/types.h>

#include <functional>
#include <vector>

#include "model/config.h"
#include "model/router.h"
#include "objective/batch_loss.h"

namespace moeforge::train {

struct MoeTerms {
  torch::Tensor aux, z;  // scalars; with a gradient only when they are part of the objective
  torch::Tensor seq;     // the sequence-wise balancing loss, defined when seq_aux_loss_coef > 0
};

// Global-batch balance (moe.balance_scope: global_batch) for one optimizer step: the aux loss's fractions f counted
// over the step's real tokens of every micro-batch and rank, each micro-batch contributing its probabilities'
// share (global_balancing_share, times `parts` because the objective is averaged over the step's micro-batches and
// ranks): the step's mean objective carries exactly the balancing loss of the whole step at once.
// Count: add_moe_terms adds each micro-batch's top-k counts to `counts`/`rows` (the trainer runs the step's
// micro-batches once without gradient first, then sums over the ranks); Apply: use them; ReduceAndApply (one
// micro-batch per rank): sum this micro-batch's counts over the ranks in the objective, then use them.
struct GlobalBalance {
  enum class Phase { Count, Apply, ReduceAndApply };
  Phase phase = Phase::Count;
  torch::Tensor counts;  // [K, E] double, CPU
  double rows = 0;       // real tokens x layers
  double parts = 1;      // micro-batches per rank x ranks
  std::function<void(std::vector<torch::Tensor>&)> all_reduce_sum;  // over the ranks
};
// Exact where the counting forward routes as the step's passes do: always on the CPU (deterministic kernels); on
// a GPU a nondeterministic kernel could flip a near-tie, moving f (which carries no gradient) by a token.
// Makes `g` the step's global-batch balance for add_moe_terms on this thread while alive.
class GlobalBalanceScope {
 public:
  explicit GlobalBalanceScope(GlobalBalance& g);
  ~GlobalBalanceScope();
  GlobalBalanceScope(const GlobalBalanceScope&) = delete;
  GlobalBalanceScope& operator=(const GlobalBalanceScope&) = delete;

 private:
  GlobalBalance* prev_;
};
// Sums a Count phase's totals over the ranks and switches to Apply.
void finish_counting(GlobalBalance& g);

// Adds aux_coef * aux (balance aux_loss, aux_coef > 0; aux_coef < 0 = the config's coefficient), then
// seq_aux_loss_coef * the sequence-wise balancing loss over sequences of `seq_len` rows (> 0; with any balance
// mode, as DeepSeek-V3 pairs it with the bias) and z_loss_coef * z (> 0) to `total`. Under a GlobalBalanceScope the
// aux term is the micro-batch's share of the step's global-batch loss (see GlobalBalance); elsewhere (evaluation)
// it is the micro-batch's own. `valid_N` (optional, 0/1 per
// token of a layer) excludes padding.
MoeTerms add_moe_terms(torch::Tensor& total, const std::vector<RouterOutput>& router, const MoEConfig& moe,
                       double aux_coef, int64_t seq_len, const torch::Tensor& valid_N = {});

// The logged numbers of a micro-batch in two host transfers: `scalars` followed by each layer's router
// entropy (the entropies go into l.entropy_per_layer), then the loads (l.load_per_layer). Returns the
// scalars as doubles, in order.
std::vector<double> fetch_logged(BatchLoss& l, const std::vector<torch::Tensor>& scalars,
                                 const std::vector<RouterOutput>& router);

}  // namespace moeforge::train
