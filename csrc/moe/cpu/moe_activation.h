// Expert activations of moe_ffn, fused and vectorised: forward from the pre-activation rows,
// backward recomputing what it needs from them, one pass each, rows in parallel.
//   gelu   (tanh approximation): 0.5 x (1 + tanh(c (x + 0.044715 x^3))), c = sqrt(2 / pi)
//   silu:  x sigmoid(x)
//   swiglu: rows are [gate | up]: silu(gate) * up
// Math in float32 (bfloat16 rows are converted per row); tanh and sigmoid through exp.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <vector>

#include "common/cpu/vec_convert.h"
#include "moe/moe_params.h"  // MoeActivation, parsed by parse_moe_activation (moe/moe_checks.h)

namespace moediffuseq::cpu {

namespace detail {

using Vec = at::vec::Vectorized<float>;
constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;

inline Vec sigmoid(const Vec& x) { return Vec(1.f) / (Vec(1.f) + x.neg().exp_u20()); }
inline float sigmoid(float x) { return 1.f / (1.f + std::exp(-x)); }

// tanh(u) = 1 - 2 / (1 + exp(2u)), saturating correctly at both ends.
inline Vec tanh_fast(const Vec& u) { return Vec(1.f) - Vec(2.f) / (Vec(1.f) + (u + u).exp_u20()); }
inline float tanh_fast(float u) { return 1.f - 2.f / (1.f + std::exp(2.f * u)); }

template <typename V>
inline V gelu(const V& x) {
  const V t = tanh_fast(V(kGeluC) * (x + V(kGeluA) * x * x * x));
  return V(0.5f) * x * (V(1.f) + t);
}
template <typename V>
inline V gelu_grad(const V& x) {
  const V t = tanh_fast(V(kGeluC) * (x + V(kGeluA) * x * x * x));
  return V(0.5f) * (V(1.f) + t) + V(0.5f) * x * (V(1.f) - t * t) * V(kGeluC) * (V(1.f) + V(3.f * kGeluA) * x * x);
}
template <typename V>
inline V silu(const V& x) { return x * sigmoid(x); }
template <typename V>
inline V silu_grad(const V& x) {
  const V s = sigmoid(x);
  return s * (V(1.f) + x * (V(1.f) - s));
}

// out[c] = f(in[c]) for c < n, vectorised with a scalar tail.
template <typename Op>
inline void map1(const float* in, float* out, int64_t n, const Op& op) {
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) op(Vec::loadu(in + c)).store(out + c);
  for (; c < n; ++c) out[c] = op(in[c]);
}
// out[c] = f(a[c], b[c]).
template <typename Op>
inline void map2(const float* a, const float* b, float* out, int64_t n, const Op& op) {
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) op(Vec::loadu(a + c), Vec::loadu(b + c)).store(out + c);
  for (; c < n; ++c) out[c] = op(a[c], b[c]);
}

}  // namespace detail

// a (rows, F) = act(h (rows, F1)); F1 = 2F for swiglu. Both row-contiguous.
inline void activation_forward(const at::Tensor& h, MoeActivation act, at::Tensor& a) {
  using namespace detail;
  const int64_t rows = h.size(0), F1 = h.size(1), F = a.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, h.scalar_type(), "moe_activation", [&] {
    const scalar_t* hp = h.data_ptr<scalar_t>();
    scalar_t* ap = a.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> in(F1), out(F);
      for (int64_t r = begin; r < end; ++r) {
        to_float(hp + r * F1, in.data(), F1);
        if (act == MoeActivation::kGelu) {
          map1(in.data(), out.data(), F, [](auto x) { return gelu(x); });
        } else if (act == MoeActivation::kSilu) {
          map1(in.data(), out.data(), F, [](auto x) { return silu(x); });
        } else {
          map2(in.data(), in.data() + F, out.data(), F, [](auto g, auto u) { return silu(g) * u; });
        }
        from_float(out.data(), ap + r * F, F);
      }
    });
  });
}

// dh (rows, F1) = d act(h) / dh * da, da (rows, F). All row-contiguous.
inline void activation_backward(const at::Tensor& da, const at::Tensor& h, MoeActivation act, at::Tensor& dh) {
  using namespace detail;
  const int64_t rows = h.size(0), F1 = h.size(1), F = da.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, h.scalar_type(), "moe_activation_backward", [&] {
    const scalar_t* hp = h.data_ptr<scalar_t>();
    const scalar_t* dap = da.data_ptr<scalar_t>();
    scalar_t* dhp = dh.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> in(F1), g(F), out(F1), tmp(F);
      for (int64_t r = begin; r < end; ++r) {
        to_float(hp + r * F1, in.data(), F1);
        to_float(dap + r * F, g.data(), F);
        if (act == MoeActivation::kGelu) {
          map2(in.data(), g.data(), out.data(), F, [](auto x, auto d) { return d * gelu_grad(x); });
        } else if (act == MoeActivation::kSilu) {
          map2(in.data(), g.data(), out.data(), F, [](auto x, auto d) { return d * silu_grad(x); });
        } else {
          const float* gate = in.data();
          const float* up = in.data() + F;
          map2(gate, g.data(), tmp.data(), F, [](auto x, auto d) { return d * silu_grad(x); });
          map2(tmp.data(), up, out.data(), F, [](auto a, auto b) { return a * b; });          // d gate
          map2(gate, g.data(), out.data() + F, F, [](auto x, auto d) { return d * silu(x); });  // d up
        }
        from_float(out.data(), dhp + r * F1, F1);
      }
    });
  });
}

}  // namespace moediffuseq::cpu
