// denoise_step and denoise_step.out: the one host entry of every backend. Checks, the device
// guard, allocation and the params struct are here; a backend registers the kernel
// (ParamsKernel, common/backends.h): cpu/denoise_step_cpu.cpp, cuda/denoise_step_kernel.cu
// through cuda/diffusion_cuda.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "common/backends.h"
#include "common/kernel_dtype.h"
#include "diffusion/diffusion_checks.h"
#include "diffusion/diffusion_params.h"

namespace moediffuseq {
namespace {

constexpr const char* kOp = "denoise_step";

// An optional (B, L, d) input and its coefficient: both or neither; checked, made contiguous.
struct OptionalTerm {
  at::Tensor x, coef;

  OptionalTerm(const std::optional<at::Tensor>& x_in, const std::optional<at::Tensor>& coef_in, const at::Tensor& x_t,
               const char* name, const char* coef_name) {
    TORCH_CHECK(x_in.has_value() == coef_in.has_value(), kOp, ": ", name, " and ", coef_name, " go together, got ",
                name, x_in ? "" : " = None", " and ", coef_name, coef_in ? "" : " = None");
    if (!x_in) return;
    check_like(*x_in, x_t, kOp, name, "x_t");
    check_per_batch(*coef_in, x_t, kOp, coef_name);
    x = x_in->contiguous();
    coef = coef_in->contiguous();
  }
  const void* data() const { return x.defined() ? x.data_ptr() : nullptr; }
  const float* coef_data() const { return coef.defined() ? coef.data_ptr<float>() : nullptr; }
};

void denoise_step_out(const at::Tensor& x_t_in, const at::Tensor& x0_hat_in, const at::Tensor& anchor_in,
                      const at::Tensor& target_mask_in, const at::Tensor& m_in, const at::Tensor& coef_xt_in,
                      const at::Tensor& coef_x0_in, const std::optional<at::Tensor>& x0_prev,
                      const std::optional<at::Tensor>& coef_x0_prev, const std::optional<at::Tensor>& noise,
                      const std::optional<at::Tensor>& coef_noise, at::Tensor& out) {
  const auto& kernel = kernels_for<ParamsKernel<DenoiseStepParams>>(x_t_in.device(), kOp);
  check_bld(x_t_in, kOp, "x_t", kernel.allow_half);
  check_like(x0_hat_in, x_t_in, kOp, "x0_hat", "x_t");
  check_like(anchor_in, x_t_in, kOp, "anchor", "x_t");
  check_target_mask(x_t_in, target_mask_in, kOp);
  check_m(x_t_in, m_in, kOp);
  check_per_batch(coef_xt_in, x_t_in, kOp, "coef_xt");
  check_per_batch(coef_x0_in, x_t_in, kOp, "coef_x0");
  const OptionalTerm prev(x0_prev, coef_x0_prev, x_t_in, "x0_prev", "coef_x0_prev");
  const OptionalTerm fresh(noise, coef_noise, x_t_in, "noise", "coef_noise");
  check_like(out, x_t_in, kOp, "out", "x_t");
  TORCH_CHECK(out.is_contiguous(), kOp, ": out must be contiguous");
  const OpDeviceGuard guard(x_t_in.device());
  const at::Tensor x_t = x_t_in.contiguous(), x0_hat = x0_hat_in.contiguous(), anchor = anchor_in.contiguous();
  const at::Tensor target_mask = target_mask_in.contiguous(), m = m_in.contiguous();
  const at::Tensor coef_xt = coef_xt_in.contiguous(), coef_x0 = coef_x0_in.contiguous();
  DenoiseStepParams p;
  p.dtype = kernel_dtype(x_t, kOp);
  p.batch = x_t.size(0);
  p.seqlen = x_t.size(1);
  p.dim = x_t.size(2);
  p.x_t = x_t.data_ptr();
  p.x0_hat = x0_hat.data_ptr();
  p.x0_prev = prev.data();
  p.noise = fresh.data();
  p.anchor = anchor.data_ptr();
  p.target_mask = target_mask.data_ptr<bool>();
  p.m = m.data_ptr();
  p.coef_xt = coef_xt.data_ptr<float>();
  p.coef_x0 = coef_x0.data_ptr<float>();
  p.coef_x0_prev = prev.coef_data();
  p.coef_noise = fresh.coef_data();
  p.out = out.data_ptr();
  kernel.run(p);
}

at::Tensor denoise_step(const at::Tensor& x_t, const at::Tensor& x0_hat, const at::Tensor& anchor,
                        const at::Tensor& target_mask, const at::Tensor& m, const at::Tensor& coef_xt,
                        const at::Tensor& coef_x0, const std::optional<at::Tensor>& x0_prev,
                        const std::optional<at::Tensor>& coef_x0_prev, const std::optional<at::Tensor>& noise,
                        const std::optional<at::Tensor>& coef_noise) {
  at::Tensor out = at::empty(x_t.sizes(), x_t.options());
  denoise_step_out(x_t, x0_hat, anchor, target_mask, m, coef_xt, coef_x0, x0_prev, coef_x0_prev, noise, coef_noise,
                   out);
  return out;
}

}  // namespace

MOEDIFFUSEQ_IMPL_CPU_AND_CUDA(m.impl("denoise_step", &denoise_step);
                              m.impl("denoise_step.out", &denoise_step_out);)

}  // namespace moediffuseq
