// moe_ffn and moe_ffn_backward: the one host entry of every backend (kernels: moe/moe_backend.h).
//   route (stable counting sort of the T*k slots by expert) -> gather the token rows into expert
//   groups -> grouped GEMM with w1 -> activation -> grouped GEMM with w2 -> combine:
//   y[t] = sum_j weights[t, j] * expert_out[row(t, j)], accumulated in float32.
// Saved for the backward: hidden (T*k, F1) and expert_out (T*k, D), the grouped rows (expert by
// expert, token order inside an expert); rows past the valid slots are zero.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "common/backends.h"
#include "moe/moe_backend.h"
#include "moe/moe_checks.h"

namespace moediffuseq {
namespace {

// One GEMM per non-empty expert: make(e, row0, n) gives the operands of expert e, whose grouped
// rows are [row0, row0 + n).
template <typename Make>
void expert_gemms(const MoeKernels& kernels, const MoeGroups& g, GemmLayout layout, const MoeShapes& s,
                  const at::Tensor& like, const char* op, const Make& make) {
  std::vector<MoeGemm> gemms;
  for (int64_t e = 0; e < s.E; ++e) {
    if (g.rows_of(e) > 0) gemms.push_back(make(e, g.offsets[e], g.rows_of(e)));
  }
  if (!gemms.empty()) kernels.grouped_gemm(gemms, layout, s, like, op);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_ffn(const at::Tensor& x_in, const at::Tensor& weights_in,
                                                       const at::Tensor& indices_in, const at::Tensor& w1_in,
                                                       const at::Tensor& w2_in, c10::string_view activation) {
  const char* op = "moe_ffn";
  const MoeActivation act = parse_moe_activation(std::string(activation), op);
  const MoeKernels& kernels = kernels_for<MoeKernels>(x_in.device(), op);
  const MoeShapes s = check_moe_inputs(x_in, weights_in, indices_in, w1_in, w2_in, act == MoeActivation::kSwiglu, op,
                                       kernels.allow_half);
  const OpDeviceGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), weights = weights_in.contiguous(), indices = indices_in.contiguous();
  const at::Tensor w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  const MoeGroups g = kernels.route(indices, s.E, op);
  const int64_t N = s.T * s.k, V = g.num_valid();

  at::Tensor hidden = at::empty({N, s.F1}, x.options());
  at::Tensor expert_out = at::empty({N, s.D}, x.options());
  hidden.narrow(0, V, N - V).zero_();  // rows past V: dropped slots
  expert_out.narrow(0, V, N - V).zero_();
  at::Tensor xg = at::empty({V, s.D}, x.options());  // token rows grouped by expert
  at::Tensor a = at::empty({V, s.F}, x.options());   // activations
  kernels.gather(x, g, s.k, nullptr, xg, op);
  expert_gemms(kernels, g, GemmLayout::kRowRow, s, x, op, [&](int64_t e, int64_t row0, int64_t n) {
    return MoeGemm{xg.narrow(0, row0, n), w1[e], hidden.narrow(0, row0, n)};
  });
  kernels.activation_forward(hidden.narrow(0, 0, V), act, a, op);
  expert_gemms(kernels, g, GemmLayout::kRowRow, s, x, op, [&](int64_t e, int64_t row0, int64_t n) {
    return MoeGemm{a.narrow(0, row0, n), w2[e], expert_out.narrow(0, row0, n)};
  });
  at::Tensor y = at::empty({s.T, s.D}, x.options());
  kernels.combine(expert_out, g, s.k, weights.data_ptr<float>(), y, op);
  return {y, hidden, expert_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_ffn_backward(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& weights_in, const at::Tensor& indices_in,
    const at::Tensor& w1_in, const at::Tensor& w2_in, const at::Tensor& hidden_in, const at::Tensor& expert_out_in,
    c10::string_view activation) {
  const char* op = "moe_ffn_backward";
  const MoeActivation act = parse_moe_activation(std::string(activation), op);
  const MoeKernels& kernels = kernels_for<MoeKernels>(x_in.device(), op);
  const MoeShapes s = check_moe_inputs(x_in, weights_in, indices_in, w1_in, w2_in, act == MoeActivation::kSwiglu, op,
                                       kernels.allow_half);
  check_moe_backward_inputs(grad_y_in, x_in, hidden_in, expert_out_in, s, op);
  const OpDeviceGuard guard(x_in.device());
  const at::Tensor grad_y = grad_y_in.contiguous(), x = x_in.contiguous(), weights = weights_in.contiguous();
  const at::Tensor indices = indices_in.contiguous(), w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  const at::Tensor hidden = hidden_in.contiguous(), expert_out = expert_out_in.contiguous();
  const MoeGroups g = kernels.route(indices, s.E, op);
  const int64_t V = g.num_valid();

  // grad of the routing weights: <dy[t], expert_out[row(t, j)]>, 0 for a dropped slot.
  at::Tensor grad_weights = at::empty({s.T, s.k}, weights.options());
  kernels.grad_weights(grad_y, expert_out, g, s.k, grad_weights, op);

  // dyg = weight * dy per grouped row; da = dyg w2^T; (a, dh) from (hidden, da) in one pass.
  at::Tensor dyg = at::empty({V, s.D}, x.options());
  kernels.gather(grad_y, g, s.k, weights.data_ptr<float>(), dyg, op);
  at::Tensor da = at::empty({V, s.F}, x.options());
  expert_gemms(kernels, g, GemmLayout::kRowCol, s, x, op, [&](int64_t e, int64_t row0, int64_t n) {
    return MoeGemm{dyg.narrow(0, row0, n), w2[e].t(), da.narrow(0, row0, n)};
  });
  at::Tensor a = at::empty({V, s.F}, x.options());
  at::Tensor dh = at::empty({V, s.F1}, x.options());
  kernels.activation_backward(hidden.narrow(0, 0, V), da, act, a, dh, op);

  // Weight gradients (K = the expert's rows); experts without rows get zeros.
  at::Tensor grad_w2 = at::empty_like(w2);
  at::Tensor grad_w1 = at::empty_like(w1);
  expert_gemms(kernels, g, GemmLayout::kColRow, s, x, op, [&](int64_t e, int64_t row0, int64_t n) {
    return MoeGemm{a.narrow(0, row0, n).t(), dyg.narrow(0, row0, n), grad_w2[e]};
  });
  at::Tensor xg = at::empty({V, s.D}, x.options());
  kernels.gather(x, g, s.k, nullptr, xg, op);
  expert_gemms(kernels, g, GemmLayout::kColRow, s, x, op, [&](int64_t e, int64_t row0, int64_t n) {
    return MoeGemm{xg.narrow(0, row0, n).t(), dh.narrow(0, row0, n), grad_w1[e]};
  });
  for (int64_t e = 0; e < s.E; ++e) {
    if (g.rows_of(e) == 0) {
      grad_w1[e].zero_();
      grad_w2[e].zero_();
    }
  }

  // dx per grouped row = dh w1^T (into dyg's buffer, dead after the grad_w2 GEMM), then each
  // token sums its k rows in float32.
  at::Tensor dxg = dyg;
  expert_gemms(kernels, g, GemmLayout::kRowCol, s, x, op, [&](int64_t e, int64_t row0, int64_t n) {
    return MoeGemm{dh.narrow(0, row0, n), w1[e].t(), dxg.narrow(0, row0, n)};
  });
  at::Tensor grad_x = at::empty({s.T, s.D}, x.options());
  kernels.combine(dxg, g, s.k, nullptr, grad_x, op);
  return {grad_x, grad_weights, grad_w1, grad_w2};
}

}  // namespace

MOEDIFFUSEQ_IMPL_CPU_AND_CUDA(m.impl("moe_ffn", &moe_ffn); m.impl("moe_ffn_backward", &moe_ffn_backward);)

}  // namespace moediffuseq
