#pragma once
#include <cstdint>
#include <string>

namespace moeforge::train {

// Learning rate at 0-based optimizer step `step` of `total` steps: linear warm-up from lr/warmup to lr
// over `warmup` steps, then
//   cosine:   min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2,  p = (step - warmup) / max(1, total - warmup - 1)
//   wsd:      lr until the last round(decay_fraction * total) steps, then linear down to min_lr at the last step
//   constant: lr
double lr_at(int64_t step, int64_t total, int64_t warmup, double lr, double min_lr, const std::string& schedule,
             double decay_fraction);

}  // namespace moeforge::train
