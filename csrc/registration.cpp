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

  // Mixture-of-experts routing (METHOD §4): softmax over experts in float32, top-k by logit
  // (ties: the lowest expert index), weights renormalised over the k chosen (float32, (T, k)),
  // indices int64 (T, k), each row by descending weight.
  m.def("moe_topk_softmax(Tensor logits, int k) -> (Tensor weights, Tensor indices)");
  // Dropless expert feed-forward: y[t] = sum_j weights[t, j] * FFN_{indices[t, j]}(x[t]);
  // index -1 marks a dropped slot. Also returns the pre-activation hidden rows and the expert
  // outputs of every slot (T*k rows, grouped by expert), which the backward reuses.
  m.def(
      "moe_ffn(Tensor x, Tensor weights, Tensor indices, Tensor w1, Tensor w2, str activation) "
      "-> (Tensor y, Tensor hidden, Tensor expert_out)");
  m.def(
      "moe_ffn_backward(Tensor grad_y, Tensor x, Tensor weights, Tensor indices, Tensor w1, Tensor w2, "
      "Tensor hidden, Tensor expert_out, str activation) "
      "-> (Tensor grad_x, Tensor grad_weights, Tensor grad_w1, Tensor grad_w2)");
}
