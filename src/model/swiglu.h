// The gated half of a SwiGLU expert for reduced precision: silu(h1) * h3 from one [n, 2I] tensor holding
// h1 | h3 (one GEMM of x against w1 and w3 stacked), with a hand-written backward that writes d(h1 | h3) into
// one [n, 2I] buffer. Autograd's version of the same (sigmoid, two muls, their backwards, the add of h1's two
// gradient terms and a cat) makes 7 passes over [n, I] in the backward; this makes 5. For bf16 experts only:
// fp32 keeps LibTorch's silu and separate GEMMs (its results unchanged bit for bit).
#pragma once
#include <ATen/core/Tensor.h>

namespace moeforge {

// h13_N2I: [n, 2I], h1 in columns [0, I), h3 in [I, 2I). Returns silu(h1) * h3, [n, I], in h13's dtype.
at::Tensor swiglu_gate(const at::Tensor& h13_N2I);

}  // namespace moeforge
