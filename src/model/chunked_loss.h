// The LM head and its cross-entropy in one pass over chunks of rows (the "fused linear cross-entropy" of
// Liger-Kernel and others, written here for LibTorch): a chunk's logits exist only while it is processed, in
// the compute dtype for the matmul and fp32 for the log-softmax, and the gradients with respect to the hidden
// states and the head's weight are formed in the same pass (the loss ends the graph, so they need only the
// incoming scalar, applied in the backward). It replaces [N, V] logits, their fp32 copy, the log-softmax output
// and its gradient (4 x 64 MB at the quickstart's 4096 rows x 4096 tokens) by one [chunk, V] buffer.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace moeforge {

// Mean over the rows whose target is not `ignore_index` of -log softmax(hidden_NH W_VH^T)[target]; W is cast
// to hidden's dtype once. Gradients reach hidden_NH and weight_VH (in their own dtypes) when they require them.
// `chunk_rows` <= 0 picks a chunk of about 2 M logits. Rows with no valid target give a loss of 0.
// The rows of a chunk for a vocabulary of `vocab`: about 2 M logits, 64 to 1024 rows (memory plans count one).
int64_t chunked_loss_rows(int64_t vocab);

at::Tensor chunked_lm_cross_entropy(const at::Tensor& hidden_NH, const at::Tensor& weight_VH,
                                    const at::Tensor& targets_N, int64_t ignore_index = -100,
                                    int64_t chunk_rows = 0);

}  // namespace moeforge
