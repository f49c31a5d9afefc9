// Mixed precision, written out: the parameters stay fp32 (the master copy the optimizer updates) and the
// matmuls run in the compute dtype (bf16) by casting each weight to the dtype of the activation it meets.
// The cast is part of the autograd graph, so each weight's gradient arrives in fp32. No autocast: the same
// code runs on CPU and CUDA, and what stays fp32 (router, norm statistics, losses) is
// decided here in the model, not by an op list of the LibTorch version at hand.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

namespace moeforge {

// x W^T, W cast to x's dtype when they differ.
at::Tensor mixed_linear(const at::Tensor& x, const at::Tensor& w);

// x in `dtype` when one is given, else x itself.
at::Tensor to_compute(const at::Tensor& x, std::optional<at::ScalarType> dtype);

// The compute dtype of a precision name: "fp32" -> none (compute in the parameters' dtype), "bf16" -> bf16.
std::optional<at::ScalarType> compute_dtype_for(const std::string& precision);

}  // namespace moeforge
