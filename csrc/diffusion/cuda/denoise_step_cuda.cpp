// CUDA denoise_step and denoise_step.out: the torch-facing half (the shared checks of
// diffusion_checks.h, device guard, current stream); the kernel is denoise_step_kernel.cu.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <optional>

#include "common/cuda/device_check.h"
#include "common/kernel_dtype.h"
#include "diffusion/cuda/diffusion_kernels.h"
#include "diffusion/diffusion_checks.h"

namespace moediffuseq::cuda {
namespace {

constexpr const char* kOp = "denoise_step";

void denoise_step_out_cuda(const at::Tensor& x_t_in, const at::Tensor& x0_hat_in,
                           const std::optional<at::Tensor>& x0_prev_in, const std::optional<at::Tensor>& noise_in,
                           const at::Tensor& anchor_in, const at::Tensor& mask_in, const at::Tensor& m_in,
                           const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& c_in,
                           const at::Tensor& s_in, at::Tensor& out) {
  check_bld(x_t_in, kOp, "x_t", /*allow_half=*/true);
  check_like(x0_hat_in, x_t_in, kOp, "x0_hat", "x_t");
  check_like(anchor_in, x_t_in, kOp, "anchor", "x_t");
  if (x0_prev_in) check_like(*x0_prev_in, x_t_in, kOp, "x0_prev", "x_t");
  if (noise_in) check_like(*noise_in, x_t_in, kOp, "noise", "x_t");
  check_mask_and_m(x_t_in, mask_in, m_in, kOp);
  const int64_t B = x_t_in.size(0);
  check_per_batch(a_in, B, kOp, "coef_xt");
  check_per_batch(b_in, B, kOp, "coef_x0");
  check_per_batch(c_in, B, kOp, "coef_x0_prev");
  check_per_batch(s_in, B, kOp, "coef_noise");
  check_like(out, x_t_in, kOp, "out", "x_t");
  TORCH_CHECK(out.is_contiguous(), kOp, ": out must be contiguous");
  check_same_device(mask_in, x_t_in, kOp, "target_mask", "x_t");
  check_same_device(m_in, x_t_in, kOp, "m", "x_t");
  check_same_device(a_in, x_t_in, kOp, "coef_xt", "x_t");
  check_same_device(b_in, x_t_in, kOp, "coef_x0", "x_t");
  check_same_device(c_in, x_t_in, kOp, "coef_x0_prev", "x_t");
  check_same_device(s_in, x_t_in, kOp, "coef_noise", "x_t");
  const CudaOpGuard guard(x_t_in.device());
  const at::Tensor x_t = x_t_in.contiguous(), x0_hat = x0_hat_in.contiguous(), anchor = anchor_in.contiguous();
  const at::Tensor x0_prev = x0_prev_in ? x0_prev_in->contiguous() : at::Tensor();
  const at::Tensor noise = noise_in ? noise_in->contiguous() : at::Tensor();
  const at::Tensor mask = mask_in.contiguous(), m = m_in.contiguous();
  const at::Tensor ca = a_in.contiguous(), cb = b_in.contiguous(), cc = c_in.contiguous(), cs = s_in.contiguous();
  DenoiseStepParams p;
  p.dtype = kernel_dtype(x_t, kOp);
  p.batch = x_t.size(0);
  p.seqlen = x_t.size(1);
  p.dim = x_t.size(2);
  p.x_t = x_t.data_ptr();
  p.x0_hat = x0_hat.data_ptr();
  p.x0_prev = x0_prev.defined() ? x0_prev.data_ptr() : nullptr;
  p.noise = noise.defined() ? noise.data_ptr() : nullptr;
  p.anchor = anchor.data_ptr();
  p.target_mask = mask.data_ptr<bool>();
  p.m = m.data_ptr();
  p.coef_xt = ca.data_ptr<float>();
  p.coef_x0 = cb.data_ptr<float>();
  p.coef_x0_prev = cc.data_ptr<float>();
  p.coef_noise = cs.data_ptr<float>();
  p.out = out.data_ptr();
  C10_CUDA_CHECK(launch_denoise_step(p, at::cuda::getCurrentCUDAStream()));
}

at::Tensor denoise_step_cuda(const at::Tensor& x_t, const at::Tensor& x0_hat, const std::optional<at::Tensor>& x0_prev,
                             const std::optional<at::Tensor>& noise, const at::Tensor& anchor, const at::Tensor& mask,
                             const at::Tensor& m, const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                             const at::Tensor& s) {
  at::Tensor out = at::empty(x_t.sizes(), x_t.options());
  denoise_step_out_cuda(x_t, x0_hat, x0_prev, noise, anchor, mask, m, a, b, c, s, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moediffuseq, CUDA, m) {
  m.impl("denoise_step", &denoise_step_cuda);
  m.impl("denoise_step.out", &denoise_step_out_cuda);
}

}  // namespace moediffuseq::cuda
