// soft_absorb_q_sample and its backward: the one host entry of every backend. Checks, the
// device guard, allocation and the params struct are here; a backend registers the kernel
// (ParamsKernel, common/backends.h): cpu/soft_absorb_q_sample_cpu.cpp,
// cuda/soft_absorb_q_sample_kernel.cu through cuda/diffusion_cuda.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/backends.h"
#include "common/kernel_dtype.h"
#include "diffusion/diffusion_checks.h"
#include "diffusion/diffusion_params.h"

namespace moediffuseq {
namespace {

constexpr const char* kOp = "soft_absorb_q_sample";

// The schedule inputs of both directions, checked against x (x0 or grad) and held contiguous.
struct Schedule {
  at::Tensor target_mask, sqrt_ab, sqrt_1mab, uniform;

  Schedule(const at::Tensor& x, const char* x_name, const at::Tensor& target_mask_in, const at::Tensor& sqrt_ab_in,
           const at::Tensor& sqrt_1mab_in, const at::Tensor& uniform_in, double gamma, bool allow_half) {
    check_bld(x, kOp, x_name, allow_half);
    check_target_mask(x, target_mask_in, kOp);
    check_q_sample_schedule(x, sqrt_ab_in, sqrt_1mab_in, uniform_in, gamma, kOp);
    target_mask = target_mask_in.contiguous();
    sqrt_ab = sqrt_ab_in.contiguous();
    sqrt_1mab = sqrt_1mab_in.contiguous();
    uniform = uniform_in.contiguous();
  }

  void fill(SoftAbsorbSchedule& p, const at::Tensor& x, double gamma) const {
    p.dtype = kernel_dtype(x, kOp);
    p.batch = x.size(0);
    p.seqlen = x.size(1);
    p.dim = x.size(2);
    p.gamma = static_cast<float>(gamma);
    p.target_mask = target_mask.data_ptr<bool>();
    p.sqrt_ab = sqrt_ab.data_ptr<float>();
    p.sqrt_1mab = sqrt_1mab.data_ptr<float>();
    p.uniform = uniform.data_ptr<float>();
  }
};

at::Tensor soft_absorb_q_sample(const at::Tensor& x0_in, const at::Tensor& m_in, const at::Tensor& target_mask,
                                const at::Tensor& sqrt_ab, const at::Tensor& sqrt_1mab, const at::Tensor& noise_in,
                                const at::Tensor& uniform, double gamma) {
  const auto& kernel = kernels_for<ParamsKernel<SoftAbsorbQSampleParams>>(x0_in.device(), kOp);
  const Schedule schedule(x0_in, "x0", target_mask, sqrt_ab, sqrt_1mab, uniform, gamma, kernel.allow_half);
  check_like(noise_in, x0_in, kOp, "noise", "x0");
  check_m(x0_in, m_in, kOp);
  const OpDeviceGuard guard(x0_in.device());
  const at::Tensor x0 = x0_in.contiguous(), m = m_in.contiguous(), noise = noise_in.contiguous();
  at::Tensor out = at::empty_like(x0);
  SoftAbsorbQSampleParams p;
  schedule.fill(p, x0, gamma);
  p.x0 = x0.data_ptr();
  p.m = m.data_ptr();
  p.noise = noise.data_ptr();
  p.out = out.data_ptr();
  kernel.run(p);
  return out;
}

std::tuple<at::Tensor, at::Tensor> soft_absorb_q_sample_backward(const at::Tensor& grad_in,
                                                                 const at::Tensor& target_mask,
                                                                 const at::Tensor& sqrt_ab,
                                                                 const at::Tensor& sqrt_1mab,
                                                                 const at::Tensor& uniform, double gamma) {
  const auto& kernel = kernels_for<ParamsKernel<SoftAbsorbQSampleBackwardParams>>(grad_in.device(), kOp);
  const Schedule schedule(grad_in, "grad", target_mask, sqrt_ab, sqrt_1mab, uniform, gamma, kernel.allow_half);
  const OpDeviceGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const int64_t B = grad.size(0), L = grad.size(1), d = grad.size(2);
  at::Tensor grad_x0 = at::empty_like(grad);
  at::Tensor grad_m = at::empty({d}, grad.options().dtype(at::kFloat));
  at::Tensor partial = at::empty({soft_absorb_backward_splits(B * L), d}, grad.options().dtype(at::kFloat));
  SoftAbsorbQSampleBackwardParams p;
  schedule.fill(p, grad, gamma);
  p.grad = grad.data_ptr();
  p.grad_x0 = grad_x0.data_ptr();
  p.grad_m = grad_m.data_ptr<float>();
  p.partial = partial.data_ptr<float>();
  kernel.run(p);
  return {grad_x0, grad_m};
}

}  // namespace

MOEDIFFUSEQ_IMPL_CPU_AND_CUDA(m.impl("soft_absorb_q_sample", &soft_absorb_q_sample);
                              m.impl("soft_absorb_q_sample_backward", &soft_absorb_q_sample_backward);)

}  // namespace moediffuseq
