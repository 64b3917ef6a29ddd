// moe_ffn and moe_ffn_backward: the one host entry of every backend (kernels: moe/moe_backend.h).
//   route (stable counting sort of the T*k slots by expert) -> gather the token rows into expert
//   groups -> grouped GEMM with w1 -> activation -> grouped GEMM with w2 -> combine:
//   y[t] = sum_j weights[t, j] * expert_out[row(t, j)], accumulated in float32.
// The experts run in passes sized by the backend (MoeKernels::pass_rows: cache-sized on the CPU,
// all experts at once on the GPU), each through that chain with buffers reused pass after pass.
// Saved for the backward: hidden (T*k, F1) and expert_out (T*k, D), the grouped rows (expert by
// expert, token order inside an expert); rows past the valid slots are zero.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "common/backends.h"
#include "moe/moe_backend.h"
#include "moe/moe_checks.h"

namespace moediffuseq {
namespace {

// The experts in passes [e0, e1) of consecutive experts holding at most kernels.pass_rows
// grouped rows (one expert at least; 0: all experts in one pass); empty passes are left out.
struct Pass {
  int64_t e0, e1, row0, rows;
};

std::vector<Pass> passes(const MoeGroups& g, int64_t E, int64_t pass_rows) {
  std::vector<Pass> out;
  for (int64_t e0 = 0; e0 < E;) {
    int64_t e1 = e0 + 1;
    while (e1 < E && (pass_rows <= 0 || g.offsets[e1 + 1] - g.offsets[e0] <= pass_rows)) ++e1;
    if (g.offsets[e1] > g.offsets[e0]) out.push_back({e0, e1, g.offsets[e0], g.offsets[e1] - g.offsets[e0]});
    e0 = e1;
  }
  return out;
}

int64_t largest(const std::vector<Pass>& ps) {
  int64_t rows = 0;
  for (const Pass& p : ps) rows = std::max(rows, p.rows);
  return rows;
}

// One GEMM per non-empty expert of the pass: make(e, i, n) gives the operands of expert e, whose
// grouped rows are the pass's rows [i, i + n).
template <typename Make>
void expert_gemms(const MoeKernels& kernels, const MoeGroups& g, const Pass& pass, GemmLayout layout,
                  const MoeShapes& s, const at::Tensor& like, const char* op, const Make& make) {
  std::vector<MoeGemm> gemms;
  for (int64_t e = pass.e0; e < pass.e1; ++e) {
    if (g.rows_of(e) > 0) gemms.push_back(make(e, g.offsets[e] - pass.row0, g.rows_of(e)));
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
  const std::vector<Pass> ps = passes(g, s.E, kernels.pass_rows);

  at::Tensor hidden = at::empty({N, s.F1}, x.options());
  at::Tensor expert_out = at::empty({N, s.D}, x.options());
  hidden.narrow(0, V, N - V).zero_();  // rows past V: dropped slots
  expert_out.narrow(0, V, N - V).zero_();
  const int64_t P = largest(ps);
  at::Tensor xg_buf = at::empty({P, s.D}, x.options());  // a pass's token rows, grouped by expert
  at::Tensor a_buf = at::empty({P, s.F}, x.options());   // its activations
  for (const Pass& pass : ps) {
    at::Tensor xg = xg_buf.narrow(0, 0, pass.rows), a = a_buf.narrow(0, 0, pass.rows);
    at::Tensor h = hidden.narrow(0, pass.row0, pass.rows), out = expert_out.narrow(0, pass.row0, pass.rows);
    kernels.gather(x, g, s.k, nullptr, pass.row0, xg, op);
    expert_gemms(kernels, g, pass, GemmLayout::kRowRow, s, x, op, [&](int64_t e, int64_t i, int64_t n) {
      return MoeGemm{xg.narrow(0, i, n), w1[e], h.narrow(0, i, n)};
    });
    kernels.activation_forward(h, act, a, op);
    expert_gemms(kernels, g, pass, GemmLayout::kRowRow, s, x, op, [&](int64_t e, int64_t i, int64_t n) {
      return MoeGemm{a.narrow(0, i, n), w2[e], out.narrow(0, i, n)};
    });
  }
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
  const std::vector<Pass> ps = passes(g, s.E, kernels.pass_rows);

  // grad of the routing weights: <dy[t], expert_out[row(t, j)]>, 0 for a dropped slot.
  at::Tensor grad_weights = at::empty({s.T, s.k}, weights.options());
  kernels.grad_weights(grad_y, expert_out, g, s.k, grad_weights, op);

  // Per pass: dyg = weight * dy per grouped row; da = dyg w2^T; (a, dh) from (hidden, da) in one
  // pass; the weight gradients (K = the expert's rows); dx per grouped row = dh w1^T.
  const int64_t P = largest(ps);
  at::Tensor dyg_buf = at::empty({P, s.D}, x.options());
  at::Tensor da_buf = at::empty({P, s.F}, x.options());
  at::Tensor a_buf = at::empty({P, s.F}, x.options());
  at::Tensor dh_buf = at::empty({P, s.F1}, x.options());
  at::Tensor xg_buf = at::empty({P, s.D}, x.options());
  // dx of every grouped row, for the combine after the last pass (one pass: dyg's buffer, dead
  // by then)
  at::Tensor dxg = ps.size() == 1 ? dyg_buf : at::empty({V, s.D}, x.options());
  at::Tensor grad_w2 = at::empty_like(w2);
  at::Tensor grad_w1 = at::empty_like(w1);
  for (const Pass& pass : ps) {
    const int64_t n = pass.rows;
    at::Tensor dyg = dyg_buf.narrow(0, 0, n), da = da_buf.narrow(0, 0, n), a = a_buf.narrow(0, 0, n);
    at::Tensor dh = dh_buf.narrow(0, 0, n), xg = xg_buf.narrow(0, 0, n);
    at::Tensor dx = dxg.narrow(0, ps.size() == 1 ? 0 : pass.row0, n);
    kernels.gather(grad_y, g, s.k, weights.data_ptr<float>(), pass.row0, dyg, op);
    expert_gemms(kernels, g, pass, GemmLayout::kRowCol, s, x, op, [&](int64_t e, int64_t i, int64_t m) {
      return MoeGemm{dyg.narrow(0, i, m), w2[e].t(), da.narrow(0, i, m)};
    });
    kernels.activation_backward(hidden.narrow(0, pass.row0, n), da, act, a, dh, op);
    expert_gemms(kernels, g, pass, GemmLayout::kColRow, s, x, op, [&](int64_t e, int64_t i, int64_t m) {
      return MoeGemm{a.narrow(0, i, m).t(), dyg.narrow(0, i, m), grad_w2[e]};
    });
    kernels.gather(x, g, s.k, nullptr, pass.row0, xg, op);
    expert_gemms(kernels, g, pass, GemmLayout::kColRow, s, x, op, [&](int64_t e, int64_t i, int64_t m) {
      return MoeGemm{xg.narrow(0, i, m).t(), dh.narrow(0, i, m), grad_w1[e]};
    });
    expert_gemms(kernels, g, pass, GemmLayout::kRowCol, s, x, op, [&](int64_t e, int64_t i, int64_t m) {
      return MoeGemm{dh.narrow(0, i, m), w1[e].t(), dx.narrow(0, i, m)};
    });
  }
  for (int64_t e = 0; e < s.E; ++e) {  // experts without rows
    if (g.rows_of(e) == 0) {
      grad_w1[e].zero_();
      grad_w2[e].zero_();
    }
  }
  // each token sums its k rows of dx in float32
  at::Tensor grad_x = at::empty({s.T, s.D}, x.options());
  kernels.combine(dxg, g, s.k, nullptr, grad_x, op);
  return {grad_x, grad_weights, grad_w1, grad_w2};
}

}  // namespace

MOEDIFFUSEQ_IMPL_CPU_AND_CUDA(m.impl("moe_ffn", &moe_ffn); m.impl("moe_ffn_backward", &moe_ffn_backward);)

}  // namespace moediffuseq
