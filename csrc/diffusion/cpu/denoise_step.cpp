// CPU denoise_step: one sampler update of the target positions and the re-anchoring of the
// source, in a single pass over (B, L, d), rows in parallel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "common/cpu/vec_convert.h"
#include "diffusion/diffusion_checks.h"

namespace moediffuseq::cpu {
namespace {

// One target row: out = a x_t + b x0_hat + wm m [+ c x0_prev] [+ s noise], float32 math,
// Vectorized<float>::size() values at a time.
template <typename T, bool kPrev, bool kNoise>
void update_row(const T* xt, const T* x0, const T* xp, const T* np, const float* mf, float a, float b, float c,
                float s, float wm, int64_t d, T* out) {
  using Vec = FloatVec;
  const Vec va(a), vb(b), vc(c), vs(s), vm(wm);
  int64_t i = 0;
  for (; i + Vec::size() <= d; i += Vec::size()) {
    Vec acc = at::vec::fmadd(va, load_float(xt + i), vm * Vec::loadu(mf + i));
    acc = at::vec::fmadd(vb, load_float(x0 + i), acc);
    if constexpr (kPrev) acc = at::vec::fmadd(vc, load_float(xp + i), acc);
    if constexpr (kNoise) acc = at::vec::fmadd(vs, load_float(np + i), acc);
    store_float(acc, out + i);
  }
  for (; i < d; ++i) {
    float v = a * static_cast<float>(xt[i]) + b * static_cast<float>(x0[i]) + wm * mf[i];
    if constexpr (kPrev) v += c * static_cast<float>(xp[i]);
    if constexpr (kNoise) v += s * static_cast<float>(np[i]);
    out[i] = static_cast<T>(v);
  }
}

constexpr const char* kOp = "denoise_step";

void denoise_step_out_cpu(const at::Tensor& x_t_in, const at::Tensor& x0_hat_in,
                                 const std::optional<at::Tensor>& x0_prev_in, const std::optional<at::Tensor>& noise_in,
                                 const at::Tensor& anchor_in, const at::Tensor& mask_in, const at::Tensor& m_in,
                                 const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& c_in,
                                 const at::Tensor& s_in, at::Tensor& out) {
  check_bld(x_t_in, kOp, "x_t");
  check_like(x0_hat_in, x_t_in, kOp, "x0_hat", "x_t");
  check_like(anchor_in, x_t_in, kOp, "anchor", "x_t");
  if (x0_prev_in) check_like(*x0_prev_in, x_t_in, kOp, "x0_prev", "x_t");
  if (noise_in) check_like(*noise_in, x_t_in, kOp, "noise", "x_t");
  check_mask_and_m(x_t_in, mask_in, m_in, kOp);
  const int64_t B = x_t_in.size(0), L = x_t_in.size(1), d = x_t_in.size(2);
  check_per_batch(a_in, B, kOp, "coef_xt");
  check_per_batch(b_in, B, kOp, "coef_x0");
  check_per_batch(c_in, B, kOp, "coef_x0_prev");
  check_per_batch(s_in, B, kOp, "coef_noise");
  const at::Tensor x_t = x_t_in.contiguous(), x0_hat = x0_hat_in.contiguous(), anchor = anchor_in.contiguous();
  const at::Tensor x0_prev = x0_prev_in ? x0_prev_in->contiguous() : at::Tensor();
  const at::Tensor noise = noise_in ? noise_in->contiguous() : at::Tensor();
  const at::Tensor mask = mask_in.contiguous(), m = m_in.contiguous();
  const at::Tensor ca = a_in.contiguous(), cb = b_in.contiguous(), cc = c_in.contiguous(), cs = s_in.contiguous();
  check_like(out, x_t_in, kOp, "out", "x_t");
  TORCH_CHECK(out.is_contiguous(), kOp, ": out must be contiguous");
  const float* pa = ca.data_ptr<float>();
  const float* pb = cb.data_ptr<float>();
  const float* pc = cc.data_ptr<float>();
  const float* ps = cs.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x_t.scalar_type(), kOp, [&] {
    const scalar_t* xt = x_t.data_ptr<scalar_t>();
    const scalar_t* x0 = x0_hat.data_ptr<scalar_t>();
    const scalar_t* xp = x0_prev.defined() ? x0_prev.data_ptr<scalar_t>() : nullptr;
    const scalar_t* np = noise.defined() ? noise.data_ptr<scalar_t>() : nullptr;
    const scalar_t* an = anchor.data_ptr<scalar_t>();
    const bool* tp = mask.data_ptr<bool>();
    scalar_t* op = out.data_ptr<scalar_t>();
    std::vector<float> mf(d);
    to_float(m.data_ptr<scalar_t>(), mf.data(), d);
    auto row_fn = xp ? (np ? &update_row<scalar_t, true, true> : &update_row<scalar_t, true, false>)
                     : (np ? &update_row<scalar_t, false, true> : &update_row<scalar_t, false, false>);
    at::parallel_for(0, B * L, 64, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / L, base = row * d;
        if (!tp[row]) {
          std::copy(an + base, an + base + d, op + base);
          continue;
        }
        const float wp = xp ? pc[b] : 0.f;
        row_fn(xt + base, x0 + base, xp ? xp + base : nullptr, np ? np + base : nullptr, mf.data(), pa[b], pb[b],
               wp, ps[b], 1.f - pa[b] - pb[b] - wp, d, op + base);
      }
    });
  });
}

at::Tensor denoise_step_cpu(const at::Tensor& x_t, const at::Tensor& x0_hat, const std::optional<at::Tensor>& x0_prev,
                            const std::optional<at::Tensor>& noise, const at::Tensor& anchor, const at::Tensor& mask,
                            const at::Tensor& m, const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                            const at::Tensor& s) {
  at::Tensor out = at::empty(x_t.sizes(), x_t.options());
  denoise_step_out_cpu(x_t, x0_hat, x0_prev, noise, anchor, mask, m, a, b, c, s, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moediffuseq, CPU, m) {
  m.impl("denoise_step", &denoise_step_cpu);
  m.impl("denoise_step.out", &denoise_step_out_cpu);
}

}  // namespace moediffuseq::cpu
