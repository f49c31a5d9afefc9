#include "model/rope.h"

#include <ATen/ATen.h>

namespace moeforge {

std::pair<at::Tensor, at::Tensor> rope_cos_sin(const at::Tensor& position_ids_BT, int64_t head_dim, double theta,
                                               at::ScalarType dtype) {
  // Angles in fp64 on the host side of precision: positions up to 1e5+ with theta 1e6 lose
  // digits in fp32; the tables are then cast to the compute dtype.
  auto opts = position_ids_BT.options().dtype(at::kDouble);
  auto exponents = at::arange(0, head_dim, 2, opts) / static_cast<double>(head_dim);
  auto inv_freq = at::pow(theta, exponents).reciprocal();                    // [D/2]
  auto freqs = position_ids_BT.to(at::kDouble).unsqueeze(-1) * inv_freq;  // [B, T, D/2]
  auto emb = at::cat({freqs, freqs}, -1);                                   // [B, T, D]
  return {emb.cos().to(dtype), emb.sin().to(dtype)};
}

at::Tensor rotate_half(const at::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  auto x1 = x.narrow(-1, 0, half);
  auto x2 = x.narrow(-1, half, half);
  return at::cat({-x2, x1}, -1);
}

at::Tensor apply_rope(const at::Tensor& x_BNTD, const at::Tensor& cos_BTD, const at::Tensor& sin_BTD) {
  auto c = cos_BTD.unsqueeze(1);
  auto s = sin_BTD.unsqueeze(1);
  return x_BNTD * c + rotate_half(x_BNTD) * s;
}

}  // namespace moeforge
