// CPU denoise_step: one sampler update of the target positions and the re-anchoring of the
// source, in a single pass over (B, L, d), rows in parallel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/diffusion_checks.h"

namespace moediffuseq::cpu {
namespace {

constexpr const char* kOp = "denoise_step";

at::Tensor denoise_step_cpu(const at::Tensor& x_t_in, const at::Tensor& x0_hat_in,
                            const std::optional<at::Tensor>& x0_prev_in, const std::optional<at::Tensor>& noise_in,
                            const at::Tensor& anchor_in, const at::Tensor& mask_in, const at::Tensor& m_in,
                            const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& c_in,
                            const at::Tensor& s_in) {
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
  at::Tensor out = at::empty_like(x_t);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x_t.scalar_type(), kOp, [&] {
    const scalar_t* xt = x_t.data_ptr<scalar_t>();
    const scalar_t* x0 = x0_hat.data_ptr<scalar_t>();
    const scalar_t* xp = x0_prev.defined() ? x0_prev.data_ptr<scalar_t>() : nullptr;
    const scalar_t* np = noise.defined() ? noise.data_ptr<scalar_t>() : nullptr;
    const scalar_t* an = anchor.data_ptr<scalar_t>();
    const scalar_t* mp = m.data_ptr<scalar_t>();
    const bool* tp = mask.data_ptr<bool>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * L, 64, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / L, base = row * d;
        scalar_t* o = op + base;
        if (!tp[row]) {
          std::copy(an + base, an + base + d, o);
          continue;
        }
        const float a = ca.data_ptr<float>()[b], w0 = cb.data_ptr<float>()[b];
        const float wp = xp ? cc.data_ptr<float>()[b] : 0.f, s = np ? cs.data_ptr<float>()[b] : 0.f;
        const float wm = 1.f - a - w0 - wp;
        for (int64_t c = 0; c < d; ++c) {
          float v = a * static_cast<float>(xt[base + c]) + w0 * static_cast<float>(x0[base + c]) +
                    wm * static_cast<float>(mp[c]);
          if (xp) v += wp * static_cast<float>(xp[base + c]);
          if (np) v += s * static_cast<float>(np[base + c]);
          o[c] = static_cast<scalar_t>(v);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moediffuseq, CPU, m) { m.impl("denoise_step", &denoise_step_cpu); }

}  // namespace moediffuseq::cpu
