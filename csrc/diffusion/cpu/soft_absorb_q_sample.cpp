// CPU soft_absorb_q_sample and its backward: one pass over (B, L, d), rows in parallel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "diffusion/diffusion_checks.h"

namespace moediffuseq::cpu {
namespace {

constexpr const char* kOp = "soft_absorb_q_sample";

at::Tensor soft_absorb_q_sample_cpu(const at::Tensor& x0_in, const at::Tensor& m_in, const at::Tensor& mask_in,
                                    const at::Tensor& sqrt_ab_in, const at::Tensor& sqrt_1mab_in,
                                    const at::Tensor& noise_in, const at::Tensor& uniform_in, double gamma) {
  check_bld(x0_in, kOp, "x0");
  check_like(noise_in, x0_in, kOp, "noise", "x0");
  check_mask_and_m(x0_in, mask_in, m_in, kOp);
  check_q_sample_schedule(x0_in, sqrt_ab_in, sqrt_1mab_in, uniform_in, gamma, kOp);
  const at::Tensor x0 = x0_in.contiguous(), m = m_in.contiguous(), mask = mask_in.contiguous();
  const at::Tensor sab = sqrt_ab_in.contiguous(), s1 = sqrt_1mab_in.contiguous();
  const at::Tensor noise = noise_in.contiguous(), uniform = uniform_in.contiguous();
  const int64_t B = x0.size(0), L = x0.size(1), d = x0.size(2);
  at::Tensor out = at::empty_like(x0);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x0.scalar_type(), kOp, [&] {
    const scalar_t* xp = x0.data_ptr<scalar_t>();
    const scalar_t* np = noise.data_ptr<scalar_t>();
    const scalar_t* mp = m.data_ptr<scalar_t>();
    const bool* tp = mask.data_ptr<bool>();
    const float* ap = sab.data_ptr<float>();
    const float* sp = s1.data_ptr<float>();
    const float* up = uniform.data_ptr<float>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * L, 64, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / L;
        const scalar_t* x = xp + row * d;
        scalar_t* o = op + row * d;
        if (!tp[row]) {
          std::copy(x, x + d, o);
        } else if (up[row] < static_cast<float>(gamma) * sp[b]) {
          std::copy(mp, mp + d, o);
        } else {
          const float a = ap[b], s = sp[b];
          const scalar_t* n = np + row * d;
          for (int64_t c = 0; c < d; ++c) {
            const float mc = static_cast<float>(mp[c]);
            o[c] = static_cast<scalar_t>(a * (static_cast<float>(x[c]) - mc) + s * static_cast<float>(n[c]) + mc);
          }
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> soft_absorb_q_sample_backward_cpu(const at::Tensor& grad_in,
                                                                     const at::Tensor& mask_in,
                                                                     const at::Tensor& sqrt_ab_in,
                                                                     const at::Tensor& sqrt_1mab_in,
                                                                     const at::Tensor& uniform_in, double gamma) {
  check_bld(grad_in, kOp, "grad");
  check_q_sample_schedule(grad_in, sqrt_ab_in, sqrt_1mab_in, uniform_in, gamma, kOp);
  const at::Tensor grad = grad_in.contiguous(), mask = mask_in.contiguous();
  const at::Tensor sab = sqrt_ab_in.contiguous(), s1 = sqrt_1mab_in.contiguous(), uniform = uniform_in.contiguous();
  const int64_t B = grad.size(0), L = grad.size(1), d = grad.size(2);
  at::Tensor grad_x0 = at::empty_like(grad);
  const int nthreads = at::get_num_threads();
  std::vector<float> partial(static_cast<size_t>(nthreads) * d, 0.f);  // per-thread sums for grad_m
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad.scalar_type(), "soft_absorb_q_sample_backward", [&] {
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const bool* tp = mask.data_ptr<bool>();
    const float* ap = sab.data_ptr<float>();
    const float* sp = s1.data_ptr<float>();
    const float* up = uniform.data_ptr<float>();
    scalar_t* dx = grad_x0.data_ptr<scalar_t>();
    at::parallel_for(0, B * L, 64, [&](int64_t begin, int64_t end) {
      float* dm = partial.data() + at::get_thread_num() * d;
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / L;
        const scalar_t* g = gp + row * d;
        scalar_t* o = dx + row * d;
        if (!tp[row]) {  // source: x_t = x0
          std::copy(g, g + d, o);
        } else if (up[row] < static_cast<float>(gamma) * sp[b]) {  // absorbed: x_t = m
          std::fill(o, o + d, scalar_t(0));
          for (int64_t c = 0; c < d; ++c) dm[c] += static_cast<float>(g[c]);
        } else {  // x_t = a x0 + (1 - a) m + s noise
          const float a = ap[b];
          for (int64_t c = 0; c < d; ++c) {
            const float gc = static_cast<float>(g[c]);
            o[c] = static_cast<scalar_t>(a * gc);
            dm[c] += (1.f - a) * gc;
          }
        }
      }
    });
  });
  at::Tensor grad_m = at::zeros({d}, grad.options().dtype(at::kFloat));
  float* gm = grad_m.data_ptr<float>();
  for (int t = 0; t < nthreads; ++t) {
    for (int64_t c = 0; c < d; ++c) gm[c] += partial[t * d + c];
  }
  return {grad_x0, grad_m};
}

}  // namespace

TORCH_LIBRARY_IMPL(moediffuseq, CPU, m) {
  m.impl("soft_absorb_q_sample", &soft_absorb_q_sample_cpu);
  m.impl("soft_absorb_q_sample_backward", &soft_absorb_q_sample_backward_cpu);
}

}  // namespace moediffuseq::cpu
