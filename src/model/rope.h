// Rotary position embedding in Hugging Face Mixtral's rotate-half convention:
// the head dimension is split in two halves (x1, x2); rotate_half(x) = (-x2, x1);
// x' = x * cos + rotate_half(x) * sin with angles pos * theta^(-2i/d) repeated for both halves.
#pragma once
#include <ATen/core/Tensor.h>

#include <utility>

namespace moeforge {

// cos and sin tables [B, T, D] for integer positions [B, T].
std::pair<at::Tensor, at::Tensor> rope_cos_sin(const at::Tensor& position_ids_BT, int64_t head_dim, double theta,
                                               at::ScalarType dtype);

// x [B, heads, T, D] rotated by cos/sin [B, T, D].
at::Tensor apply_rope(const at::Tensor& x_BNTD, const at::Tensor& cos_BTD, const at::Tensor& sin_BTD);

at::Tensor rotate_half(const at::Tensor& x);

}  // namespace moeforge
