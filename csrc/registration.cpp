// Every op schema of the library, declared once. Backends register implementations in
// csrc/cpu/*.cpp and csrc/cuda/*.cpp with TORCH_LIBRARY_IMPL(moediffuseq, <Backend>, m);
// moediffuseq/ops/<op>.py adds the fake (meta) kernel and autograd on top.
#include <torch/library.h>

TORCH_LIBRARY(moediffuseq, m) {
  // Block-sparse attention (METHOD §3). q, k, v: (B, H, L, D). Returns the output (B, H, L, D)
  // and the per-row log-sum-exp of the scaled scores (B, H, L) in float32, +inf for a row with
  // no allowed key (its output is zero), which the backward uses to rebuild the probabilities.
  m.def(
      "block_sparse_attention(Tensor q, Tensor k, Tensor v, int window, int dilation, "
      "Tensor? global_mask, Tensor? key_padding_mask, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "block_sparse_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, int window, int dilation, Tensor? global_mask, Tensor? key_padding_mask, "
      "float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
}
