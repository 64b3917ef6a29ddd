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

#include "cpu/moe_routing.h"

namespace moediffuseq::cpu {
namespace {

enum class Activation { kGelu, kSilu, kSwiglu };

Activation parse_activation(const std::string& name, const char* op) {
  if (name == "gelu") return Activation::kGelu;
  if (name == "silu") return Activation::kSilu;
  if (name == "swiglu") return Activation::kSwiglu;
  TORCH_CHECK(false, op, ": activation must be \"gelu\", \"silu\" or \"swiglu\", got \"", name, "\"");
}

// gelu uses the tanh approximation (as GPT-2 / BERT implementations commonly do).
at::Tensor activate(const at::Tensor& h, Activation act) {
  switch (act) {
    case Activation::kGelu: return at::gelu(h, "tanh");
    case Activation::kSilu: return at::silu(h);
    case Activation::kSwiglu: {
      const int64_t F = h.size(1) / 2;
      return at::silu(h.narrow(1, 0, F)) * h.narrow(1, F, F);  // gate half, up half
    }
  }
  return h;
}

at::Tensor activate_backward(const at::Tensor& grad, const at::Tensor& h, Activation act) {
  switch (act) {
    case Activation::kGelu: return at::gelu_backward(grad, h, "tanh");
    case Activation::kSilu: return at::silu_backward(grad, h);
    case Activation::kSwiglu: {
      const int64_t F = h.size(1) / 2;
      const at::Tensor gate = h.narrow(1, 0, F), up = h.narrow(1, F, F);
      return at::cat({at::silu_backward(grad * up, gate), grad * at::silu(gate)}, 1);
    }
  }
  return grad;
}

struct MoeShapes {
  int64_t T, D, k, E, F1, F;
};

MoeShapes check_moe_inputs(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& indices,
                           const at::Tensor& w1, const at::Tensor& w2, Activation act, const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be (T, D), got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
  const int64_t T = x.size(0), D = x.size(1);
  TORCH_CHECK(indices.dim() == 2 && indices.size(0) == T, op, ": indices must be (T, k) with T = ", T,
              ", got shape ", indices.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong, op, ": indices must be int64, got ", indices.scalar_type());
  const int64_t k = indices.size(1);
  TORCH_CHECK(weights.sizes() == indices.sizes(), op, ": weights must be (T, k) = ", indices.sizes(),
              " like indices, got ", weights.sizes());
  TORCH_CHECK(weights.scalar_type() == at::kFloat, op, ": weights must be float32, got ", weights.scalar_type());
  TORCH_CHECK(w1.dim() == 3 && w1.size(1) == D, op, ": w1 must be (E, D, F) with D = ", D, ", got shape ",
              w1.sizes());
  const int64_t E = w1.size(0), F1 = w1.size(2);
  const int64_t F = act == Activation::kSwiglu ? F1 / 2 : F1;
  TORCH_CHECK(act != Activation::kSwiglu || F1 % 2 == 0, op,
              ": with swiglu, w1 must be (E, D, 2F) (gate and up halves), got odd width ", F1);
  TORCH_CHECK(w2.dim() == 3 && w2.size(0) == E && w2.size(1) == F && w2.size(2) == D, op,
              ": w2 must be (E, F, D) = (", E, ", ", F, ", ", D, "), got shape ", w2.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"w1", &w1}, {"w2", &w2}}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": ", name, " must have the dtype of x (",
                x.scalar_type(), "), got ", t->scalar_type());
  }
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"weights", &weights},
                                {"indices", &indices}, {"w1", &w1}, {"w2", &w2}}) {
    TORCH_CHECK(t->device() == x.device(), op, ": ", name, " must be on the device of x (", x.device(), "), got ",
                t->device());
  }
  return {T, D, k, E, F1, F};
}

// dst[row] = src[slot_of_row[row] / k] for every grouped row (optionally scaled by the slot's
// routing weight).
void gather_rows(const at::Tensor& src, const MoeRouting& r, int64_t k, at::Tensor& dst, const float* scale) {
  const int64_t D = src.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, src.scalar_type(), "moe_gather", [&] {
    const scalar_t* s = src.data_ptr<scalar_t>();
    scalar_t* d = dst.data_ptr<scalar_t>();
    at::parallel_for(0, r.num_valid(), 64, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t slot = r.slot_of_row[row];
        const scalar_t* in = s + (slot / k) * D;
        scalar_t* out = d + row * D;
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

// out rows of expert e = a rows of expert e @ b(e) for every non-empty expert.
template <typename B>
void grouped_mm(const at::Tensor& a, const MoeRouting& r, const B& b_of, at::Tensor& out) {
  for (int64_t e = 0; e + 1 < static_cast<int64_t>(r.offsets.size()); ++e) {
    const int64_t n = r.rows_of(e);
    if (n == 0) continue;
    at::Tensor dst = out.narrow(0, r.offsets[e], n);
    at::mm_out(dst, a.narrow(0, r.offsets[e], n), b_of(e));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_ffn_cpu(const at::Tensor& x_in, const at::Tensor& weights_in,
                                                           const at::Tensor& indices_in, const at::Tensor& w1_in,
                                                           const at::Tensor& w2_in, c10::string_view activation) {
  const char* op = "moe_ffn";
  const Activation act = parse_activation(std::string(activation), op);
  const MoeShapes s = check_moe_inputs(x_in, weights_in, indices_in, w1_in, w2_in, act, op);
  const at::Tensor x = x_in.contiguous(), weights = weights_in.contiguous(), indices = indices_in.contiguous();
  const at::Tensor w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  const MoeRouting r = route_slots(indices, s.E, op);
  const int64_t N = s.T * s.k, V = r.num_valid();

  at::Tensor xg = at::empty({V, s.D}, x.options());
  gather_rows(x, r, s.k, xg, nullptr);
  at::Tensor hidden = at::zeros({N, s.F1}, x.options());  // rows past V: dropped slots
  grouped_mm(xg, r, [&](int64_t e) { return w1[e]; }, hidden);
  const at::Tensor a = activate(hidden.narrow(0, 0, V), act);
  at::Tensor expert_out = at::zeros({N, s.D}, x.options());
  grouped_mm(a, r, [&](int64_t e) { return w2[e]; }, expert_out);
  at::Tensor y = at::empty({s.T, s.D}, x.options());
  combine_rows(expert_out, r, s.T, s.k, weights.data_ptr<float>(), y);
  return {y, hidden, expert_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_ffn_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& weights_in, const at::Tensor& indices_in,
    const at::Tensor& w1_in, const at::Tensor& w2_in, const at::Tensor& hidden_in, const at::Tensor& expert_out_in,
    c10::string_view activation) {
  const char* op = "moe_ffn_backward";
  const Activation act = parse_activation(std::string(activation), op);
  const MoeShapes s = check_moe_inputs(x_in, weights_in, indices_in, w1_in, w2_in, act, op);
  const int64_t N = s.T * s.k;
  TORCH_CHECK(grad_y_in.sizes() == x_in.sizes() && grad_y_in.scalar_type() == x_in.scalar_type(), op,
              ": grad_y must match x ", x_in.sizes(), " ", x_in.scalar_type(), ", got ", grad_y_in.sizes(), " ",
              grad_y_in.scalar_type());
  TORCH_CHECK(hidden_in.dim() == 2 && hidden_in.size(0) == N && hidden_in.size(1) == s.F1, op,
              ": hidden must be (T*k, F1) = (", N, ", ", s.F1, "), got ", hidden_in.sizes());
  TORCH_CHECK(expert_out_in.dim() == 2 && expert_out_in.size(0) == N && expert_out_in.size(1) == s.D, op,
              ": expert_out must be (T*k, D) = (", N, ", ", s.D, "), got ", expert_out_in.sizes());
  const at::Tensor grad_y = grad_y_in.contiguous(), x = x_in.contiguous(), weights = weights_in.contiguous();
  const at::Tensor indices = indices_in.contiguous(), w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  const at::Tensor hidden = hidden_in.contiguous(), expert_out = expert_out_in.contiguous();
  const MoeRouting r = route_slots(indices, s.E, op);
  const int64_t V = r.num_valid();
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
        float acc = 0.f;
        for (int64_t c = 0; c < s.D; ++c) acc += static_cast<float>(a[c]) * static_cast<float>(b[c]);
        gw[slot] = acc;
      }
    });
  });

  at::Tensor dy_g = at::empty({V, s.D}, x.options());  // weight * dy, grouped
  gather_rows(grad_y, r, s.k, dy_g, w);
  const at::Tensor h = hidden.narrow(0, 0, V);
  const at::Tensor a = activate(h, act);
  at::Tensor da = at::empty({V, s.F}, x.options());
  grouped_mm(dy_g, r, [&](int64_t e) { return w2[e].t(); }, da);
  at::Tensor grad_w2 = at::zeros_like(w2);
  at::Tensor grad_w1 = at::zeros_like(w1);
  for (int64_t e = 0; e < s.E; ++e) {
    const int64_t n = r.rows_of(e);
    if (n == 0) continue;
    at::Tensor dst = grad_w2[e];
    at::mm_out(dst, a.narrow(0, r.offsets[e], n).t(), dy_g.narrow(0, r.offsets[e], n));
  }
  const at::Tensor dh = activate_backward(da, h, act);
  at::Tensor xg = at::empty({V, s.D}, x.options());
  gather_rows(x, r, s.k, xg, nullptr);
  for (int64_t e = 0; e < s.E; ++e) {
    const int64_t n = r.rows_of(e);
    if (n == 0) continue;
    at::Tensor dst = grad_w1[e];
    at::mm_out(dst, xg.narrow(0, r.offsets[e], n).t(), dh.narrow(0, r.offsets[e], n));
  }
  at::Tensor dxg = at::empty({V, s.D}, x.options());
  grouped_mm(dh, r, [&](int64_t e) { return w1[e].t(); }, dxg);
  at::Tensor grad_x = at::empty_like(x);
  combine_rows(dxg, r, s.T, s.k, nullptr, grad_x);
  return {grad_x, grad_weights, grad_w1, grad_w2};
}

}  // namespace

TORCH_LIBRARY_IMPL(moediffuseq, CPU, m) {
  m.impl("moe_ffn", &moe_ffn_cpu);
  m.impl("moe_ffn_backward", &moe_ffn_backward_cpu);
}

}  // namespace moediffuseq::cpu
