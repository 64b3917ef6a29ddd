// CPU moe_ffn: dropless mixture-of-experts feed-forward, forward and backward.
//   route (counting sort of the T*k slots by expert) -> gather token rows into expert groups
//   -> per-group GEMM with w1[e] -> activation -> per-group GEMM with w2[e]
//   -> combine: y[t] = sum_j weights[t, j] * out[row(t, j)], accumulated in float32.
// Groups are contiguous row ranges of one buffer, so each expert is one GEMM on a view (ATen's
// oneDNN/MKL GEMMs, multithreaded); gather and combine are single parallel passes.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "common/cpu/vec_convert.h"
#include "moe/cpu/moe_activation.h"
#include "moe/cpu/moe_routing.h"
#include "moe/moe_checks.h"

namespace moediffuseq::cpu {
namespace {

// sum_c a[c] * b[c] in float32, vectorised.
template <typename T>
float dot_float(const T* a, const T* b, int64_t n) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t kV = Vec::size();
  float fa[kV], fb[kV];
  Vec acc(0.f);
  int64_t c = 0;
  for (; c + kV <= n; c += kV) {
    to_float(a + c, fa, kV);
    to_float(b + c, fb, kV);
    acc = at::vec::fmadd(Vec::loadu(fa), Vec::loadu(fb), acc);
  }
  float sum = acc.reduce_add();
  for (; c < n; ++c) sum += static_cast<float>(a[c]) * static_cast<float>(b[c]);
  return sum;
}

// dst (n x D) = src[slot_of_row[row] / k] for grouped rows [row0, row0 + n), optionally scaled
// by the slot's routing weight.
void gather_rows(const at::Tensor& src, const MoeRouting& r, int64_t k, int64_t row0, int64_t n, at::Tensor& dst,
                 const float* scale) {
  const int64_t D = src.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, src.scalar_type(), "moe_gather", [&] {
    const scalar_t* s = src.data_ptr<scalar_t>();
    scalar_t* d = dst.data_ptr<scalar_t>();
    at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t slot = r.slot_of_row[row0 + i];
        const scalar_t* in = s + (slot / k) * D;
        scalar_t* out = d + i * D;
        if (scale) {
          const float w = scale[slot];
          for (int64_t c = 0; c < D; ++c) out[c] = static_cast<scalar_t>(w * static_cast<float>(in[c]));
        } else {
          std::copy(in, in + D, out);
        }
      }
    });
  });
}

// acc[token of grouped row row0 + i] += rows[i] (float32 accumulators (T x D)). The rows of one
// expert belong to distinct tokens, so rows run in parallel without conflicts.
void scatter_add_rows(const at::Tensor& rows, const MoeRouting& r, int64_t k, int64_t row0, float* acc) {
  const int64_t n = rows.size(0), D = rows.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, rows.scalar_type(), "moe_scatter_add", [&] {
    const scalar_t* in = rows.data_ptr<scalar_t>();
    at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        float* dst = acc + (r.slot_of_row[row0 + i] / k) * D;
        const scalar_t* src = in + i * D;
        for (int64_t c = 0; c < D; ++c) dst[c] += static_cast<float>(src[c]);
      }
    });
  });
}

// out[t] = sum_j scale[t, j] * rows[row_of_slot(t, j)] (scale null: 1), float32 accumulation.
void combine_rows(const at::Tensor& rows, const MoeRouting& r, int64_t T, int64_t k, const float* scale,
                  at::Tensor& out) {
  const int64_t D = rows.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, rows.scalar_type(), "moe_combine", [&] {
    const scalar_t* in = rows.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(D);
      for (int64_t t = begin; t < end; ++t) {
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t j = 0; j < k; ++j) {
          const int64_t row = r.row_of_slot[t * k + j];
          if (row < 0) continue;
          const float w = scale ? scale[t * k + j] : 1.f;
          const scalar_t* x = in + row * D;
          for (int64_t c = 0; c < D; ++c) acc[c] += w * static_cast<float>(x[c]);
        }
        for (int64_t c = 0; c < D; ++c) o[t * D + c] = static_cast<scalar_t>(acc[c]);
      }
    });
  });
}

int64_t largest_group(const MoeRouting& r) {
  int64_t n = 0;
  for (int64_t e = 0; e + 1 < static_cast<int64_t>(r.offsets.size()); ++e) n = std::max(n, r.rows_of(e));
  return n;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_ffn_cpu(const at::Tensor& x_in, const at::Tensor& weights_in,
                                                           const at::Tensor& indices_in, const at::Tensor& w1_in,
                                                           const at::Tensor& w2_in, c10::string_view activation) {
  const char* op = "moe_ffn";
  const MoeActivation act = parse_moe_activation(std::string(activation), op);
  const MoeShapes s = check_moe_inputs(x_in, weights_in, indices_in, w1_in, w2_in, act == MoeActivation::kSwiglu, op);
  const at::Tensor x = x_in.contiguous(), weights = weights_in.contiguous(), indices = indices_in.contiguous();
  const at::Tensor w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  const MoeRouting r = route_slots(indices, s.E, op);
  const int64_t N = s.T * s.k, V = r.num_valid();

  // One expert at a time through buffers sized for the largest group: the gathered rows and
  // the activations never exist for all T*k slots at once.
  const int64_t max_rows = largest_group(r);
  at::Tensor xg = at::empty({max_rows, s.D}, x.options());
  at::Tensor a = at::empty({max_rows, s.F}, x.options());
  at::Tensor hidden = at::empty({N, s.F1}, x.options());
  at::Tensor expert_out = at::empty({N, s.D}, x.options());
  hidden.narrow(0, V, N - V).zero_();  // rows past V: dropped slots
  expert_out.narrow(0, V, N - V).zero_();
  for (int64_t e = 0; e < s.E; ++e) {
    const int64_t n = r.rows_of(e), row0 = r.offsets[e];
    if (n == 0) continue;
    at::Tensor xg_e = xg.narrow(0, 0, n), a_e = a.narrow(0, 0, n);
    at::Tensor h_e = hidden.narrow(0, row0, n), out_e = expert_out.narrow(0, row0, n);
    gather_rows(x, r, s.k, row0, n, xg_e, nullptr);
    at::mm_out(h_e, xg_e, w1[e]);
    activation_forward(h_e, act, a_e);
    at::mm_out(out_e, a_e, w2[e]);
  }
  at::Tensor y = at::empty({s.T, s.D}, x.options());
  combine_rows(expert_out, r, s.T, s.k, weights.data_ptr<float>(), y);
  return {y, hidden, expert_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_ffn_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& weights_in, const at::Tensor& indices_in,
    const at::Tensor& w1_in, const at::Tensor& w2_in, const at::Tensor& hidden_in, const at::Tensor& expert_out_in,
    c10::string_view activation) {
  const char* op = "moe_ffn_backward";
  const MoeActivation act = parse_moe_activation(std::string(activation), op);
  const MoeShapes s = check_moe_inputs(x_in, weights_in, indices_in, w1_in, w2_in, act == MoeActivation::kSwiglu, op);
  const int64_t N = s.T * s.k;
  check_moe_backward_inputs(grad_y_in, x_in, hidden_in, expert_out_in, s, op);
  const at::Tensor grad_y = grad_y_in.contiguous(), x = x_in.contiguous(), weights = weights_in.contiguous();
  const at::Tensor indices = indices_in.contiguous(), w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  const at::Tensor hidden = hidden_in.contiguous(), expert_out = expert_out_in.contiguous();
  const MoeRouting r = route_slots(indices, s.E, op);
  const float* w = weights.data_ptr<float>();

  // grad of the routing weights: <dy[t], out[row(t, j)]>
  at::Tensor grad_weights = at::zeros({s.T, s.k}, weights.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "moe_grad_weights", [&] {
    const scalar_t* dy = grad_y.data_ptr<scalar_t>();
    const scalar_t* out = expert_out.data_ptr<scalar_t>();
    float* gw = grad_weights.data_ptr<float>();
    at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
      for (int64_t slot = begin; slot < end; ++slot) {
        const int64_t row = r.row_of_slot[slot];
        if (row < 0) continue;
        const scalar_t* a = dy + (slot / s.k) * s.D;
        const scalar_t* b = out + row * s.D;
        gw[slot] = dot_float(a, b, s.D);
      }
    });
  });

  // Expert by expert, through buffers sized for the largest group (as the forward).
  const int64_t max_rows = largest_group(r);
  at::Tensor dyg = at::empty({max_rows, s.D}, x.options());  // weight * dy of the expert's slots
  at::Tensor xg = at::empty({max_rows, s.D}, x.options());
  at::Tensor dxg = at::empty({max_rows, s.D}, x.options());
  at::Tensor a = at::empty({max_rows, s.F}, x.options());
  at::Tensor da = at::empty({max_rows, s.F}, x.options());
  at::Tensor dh = at::empty({max_rows, s.F1}, x.options());
  at::Tensor grad_w1 = at::empty_like(w1);
  at::Tensor grad_w2 = at::empty_like(w2);
  at::Tensor grad_x_acc = at::zeros({s.T, s.D}, x.options().dtype(at::kFloat));
  for (int64_t e = 0; e < s.E; ++e) {
    const int64_t n = r.rows_of(e), row0 = r.offsets[e];
    if (n == 0) {
      grad_w1[e].zero_();
      grad_w2[e].zero_();
      continue;
    }
    at::Tensor dyg_e = dyg.narrow(0, 0, n), xg_e = xg.narrow(0, 0, n), dxg_e = dxg.narrow(0, 0, n);
    at::Tensor a_e = a.narrow(0, 0, n), da_e = da.narrow(0, 0, n), dh_e = dh.narrow(0, 0, n);
    const at::Tensor h_e = hidden.narrow(0, row0, n);
    gather_rows(grad_y, r, s.k, row0, n, dyg_e, w);
    at::mm_out(da_e, dyg_e, w2[e].t());
    activation_forward(h_e, act, a_e);
    at::Tensor gw2 = grad_w2[e];
    at::mm_out(gw2, a_e.t(), dyg_e);
    activation_backward(da_e, h_e, act, dh_e);
    gather_rows(x, r, s.k, row0, n, xg_e, nullptr);
    at::Tensor gw1 = grad_w1[e];
    at::mm_out(gw1, xg_e.t(), dh_e);
    at::mm_out(dxg_e, dh_e, w1[e].t());
    scatter_add_rows(dxg_e, r, s.k, row0, grad_x_acc.data_ptr<float>());
  }
  const at::Tensor grad_x = grad_x_acc.to(x.scalar_type());
  return {grad_x, grad_weights, grad_w1, grad_w2};
}

}  // namespace

TORCH_LIBRARY_IMPL(moediffuseq, CPU, m) {
  m.impl("moe_ffn", &moe_ffn_cpu);
  m.impl("moe_ffn_backward", &moe_ffn_backward_cpu);
}

}  // namespace moediffuseq::cpu
