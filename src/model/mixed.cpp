#include "model/mixed.h"

#include <ATen/ATen.h>

#include "core/error.h"

namespace moeforge {

at::Tensor mixed_linear(const at::Tensor& x, const at::Tensor& w) {
  return at::linear(x, w.scalar_type() == x.scalar_type() ? w : w.to(x.scalar_type()));
}

at::Tensor to_compute(const at::Tensor& x, std::optional<at::ScalarType> dtype) {
  return dtype && x.scalar_type() != *dtype ? x.to(*dtype) : x;
}

std::optional<at::ScalarType> compute_dtype_for(const std::string& precision) {
  if (precision == "fp32") return std::nullopt;
  if (precision == "bf16") return at::kBFloat16;
  throw UserError("precision must be fp32 or bf16, got '" + precision + "'");
}

}  // namespace moeforge
