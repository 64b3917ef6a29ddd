// Every op schema of the library, declared once. Implementations are registered with
// TORCH_LIBRARY_IMPL(moediffuseq, <Backend>, m) by each op's host entry (csrc/<subject>/*.cpp,
// for the CPU and CUDA keys) or by the backend files (csrc/<subject>/{cpu,cuda}/*.cpp);
// moediffuseq/ops/<op>.py adds the fake (meta) kernel and autograd on top.
#include <torch/library.h>

TORCH_LIBRARY(moediffuseq, m) {
  // Block-sparse attention (METHOD §3). q: (B, H, L_q, D), k, v: (B, H_kv, L, D) with H a
  // multiple of H_kv (grouped-query attention: query head h reads key/value head h / (H / H_kv));
  // layout "blhd" takes all three as (B, L, heads, D) instead (any strides with a contiguous D).
  // Query row r is key position i = query_offset + r (0 <= query_offset, query_offset + L_q <= L;
  // L_q = L and offset 0 by default), and every mask is on positions: global_mask and
  // key_padding_mask are (B, L), a query row is global when its position is.
  // allowed(i, j) = j not padded and (i global or j global or (|i - j| <= window * dilation and
  // (i - j) mod dilation == 0)) and, when causal, j <= i (a global token then attends to the past
  // only and is attended by the queries at or after it), and i >= S_b or j < S_b: with
  // source_lengths (int64 (B), 0 <= S_b <= L) positions [0, S_b) of batch b are its source, whose
  // queries see source keys only; the target (i >= S_b) attends as without it. Returns the output
  // in the layout and shape of q (contiguous) and the per-row log-sum-exp of the scaled scores
  // (B, H, L_q) in float32, +inf for a row with no allowed key (its output is zero), which the
  // backward uses to rebuild the probabilities. The gradients come back in the shapes (and
  // layout) of q, k, v.
  m.def(
      "block_sparse_attention(Tensor q, Tensor k, Tensor v, int window, int dilation, "
      "Tensor? global_mask, Tensor? key_padding_mask, float scale, bool causal=False, "
      "str layout=\"bhld\", Tensor? source_lengths=None, int query_offset=0) -> (Tensor out, Tensor lse)");
  m.def(
      "block_sparse_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, int window, int dilation, Tensor? global_mask, Tensor? key_padding_mask, "
      "float scale, bool causal=False, str layout=\"bhld\", Tensor? source_lengths=None, int query_offset=0) "
      "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");

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

  // Forward process with the soft absorbing state (METHOD §5). x0, noise: (B, L, d); m: (d);
  // target_mask: (B, L) bool, true on target positions; sqrt_ab, sqrt_1mab, uniform: float32
  // (B), (B), (B, L). Target positions: replaced by m where uniform < gamma * sqrt_1mab, else
  // sqrt_ab (x0 - m) + sqrt_1mab noise + m. Source positions: x0.
  m.def(
      "soft_absorb_q_sample(Tensor x0, Tensor m, Tensor target_mask, Tensor sqrt_ab, Tensor sqrt_1mab, "
      "Tensor noise, Tensor uniform, float gamma) -> Tensor");
  m.def(
      "soft_absorb_q_sample_backward(Tensor grad, Tensor target_mask, Tensor sqrt_ab, Tensor sqrt_1mab, "
      "Tensor uniform, float gamma) -> (Tensor grad_x0, Tensor grad_m)");  // grad_m: float32 (d)
  // One sampler update on the target positions, the source re-anchored, in one pass (METHOD §6):
  //   target: x = coef_xt x_t + coef_x0 x0_hat + coef_x0_prev x0_prev + coef_noise noise
  //               + (1 - coef_xt - coef_x0 - coef_x0_prev) m;  source: x = anchor.
  // Coefficients: float32 (B). x0_prev and noise are optional, each with its coefficient (both
  // or neither; an absent term is left out). The .out overload writes into a preallocated
  // contiguous tensor (samplers reuse buffers), which may be x_t itself.
  m.def(
      "denoise_step(Tensor x_t, Tensor x0_hat, Tensor anchor, Tensor target_mask, Tensor m, Tensor coef_xt, "
      "Tensor coef_x0, Tensor? x0_prev=None, Tensor? coef_x0_prev=None, Tensor? noise=None, "
      "Tensor? coef_noise=None) -> Tensor");
  m.def(
      "denoise_step.out(Tensor x_t, Tensor x0_hat, Tensor anchor, Tensor target_mask, Tensor m, Tensor coef_xt, "
      "Tensor coef_x0, Tensor? x0_prev=None, Tensor? coef_x0_prev=None, Tensor? noise=None, "
      "Tensor? coef_noise=None, *, Tensor(a!) out) -> ()");
  // For each row of x (N, d), the index of the nearest row of emb (V, d) in Euclidean distance
  // (ties: the lowest index), computed in chunks of the vocabulary.
  m.def("nearest_embedding(Tensor x, Tensor emb) -> Tensor");
}
