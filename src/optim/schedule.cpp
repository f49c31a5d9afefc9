#include "optim/schedule.h"

#include <algorithm>
#include <cmath>

namespace moeforge::train {

double lr_at(int64_t step, int64_t total, int64_t warmup, double lr, double min_lr, const std::string& schedule,
             double decay_fraction) {
  if (step < warmup) return lr * static_cast<double>(step + 1) / static_cast<double>(warmup);
  if (schedule == "constant") return lr;
  if (schedule == "wsd") {
    const int64_t decay_steps = std::llround(decay_fraction * static_cast<double>(total));
    const int64_t start = std::max(warmup, total - decay_steps);
    if (step < start || decay_steps == 0) return lr;
    const double p = static_cast<double>(step - start + 1) / static_cast<double>(total - start);
    return lr + (min_lr - lr) * std::min(1.0, p);
  }
  const double span = static_cast<double>(std::max<int64_t>(1, total - warmup - 1));
  const double p = std::min(1.0, static_cast<double>(step - warmup) / span);
  return min_lr + (lr - min_lr) * 0.5 * (1.0 + std::cos(M_PI * p));
}

}  // namespace moeforge::train
