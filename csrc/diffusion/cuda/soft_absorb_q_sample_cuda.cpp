// CUDA soft_absorb_q_sample and its backward: the torch-facing half (the shared checks of
// diffusion_checks.h, device guard, current stream); kernels in soft_absorb_q_sample_kernel.cu.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include "common/cuda/device_check.h"
#include "common/kernel_dtype.h"
#include "diffusion/cuda/diffusion_kernels.h"
#include "diffusion/diffusion_checks.h"

namespace moediffuseq::cuda {
namespace {

constexpr const char* kOp = "soft_absorb_q_sample";

void check_devices(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& sqrt_ab,
                   const at::Tensor& sqrt_1mab, const at::Tensor& uniform, const char* x_name) {
  check_same_device(mask, x, kOp, "target_mask", x_name);
  check_same_device(sqrt_ab, x, kOp, "sqrt_ab", x_name);
  check_same_device(sqrt_1mab, x, kOp, "sqrt_1mab", x_name);
  check_same_device(uniform, x, kOp, "uniform", x_name);
}

at::Tensor soft_absorb_q_sample_cuda(const at::Tensor& x0_in, const at::Tensor& m_in, const at::Tensor& mask_in,
                                     const at::Tensor& sqrt_ab_in, const at::Tensor& sqrt_1mab_in,
                                     const at::Tensor& noise_in, const at::Tensor& uniform_in, double gamma) {
  check_bld(x0_in, kOp, "x0", /*allow_half=*/true);
  check_like(noise_in, x0_in, kOp, "noise", "x0");
  check_mask_and_m(x0_in, mask_in, m_in, kOp);
  check_q_sample_schedule(x0_in, sqrt_ab_in, sqrt_1mab_in, uniform_in, gamma, kOp);
  check_same_device(m_in, x0_in, kOp, "m", "x0");
  check_devices(x0_in, mask_in, sqrt_ab_in, sqrt_1mab_in, uniform_in, "x0");
  const CudaOpGuard guard(x0_in.device());
  const at::Tensor x0 = x0_in.contiguous(), m = m_in.contiguous(), mask = mask_in.contiguous();
  const at::Tensor sab = sqrt_ab_in.contiguous(), s1 = sqrt_1mab_in.contiguous();
  const at::Tensor noise = noise_in.contiguous(), uniform = uniform_in.contiguous();
  at::Tensor out = at::empty_like(x0);
  SoftAbsorbQSampleParams p;
  p.dtype = kernel_dtype(x0, kOp);
  p.batch = x0.size(0);
  p.seqlen = x0.size(1);
  p.dim = x0.size(2);
  p.gamma = static_cast<float>(gamma);
  p.x0 = x0.data_ptr();
  p.m = m.data_ptr();
  p.target_mask = mask.data_ptr<bool>();
  p.sqrt_ab = sab.data_ptr<float>();
  p.sqrt_1mab = s1.data_ptr<float>();
  p.noise = noise.data_ptr();
  p.uniform = uniform.data_ptr<float>();
  p.out = out.data_ptr();
  C10_CUDA_CHECK(launch_soft_absorb_q_sample(p, at::cuda::getCurrentCUDAStream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> soft_absorb_q_sample_backward_cuda(const at::Tensor& grad_in,
                                                                      const at::Tensor& mask_in,
                                                                      const at::Tensor& sqrt_ab_in,
                                                                      const at::Tensor& sqrt_1mab_in,
                                                                      const at::Tensor& uniform_in, double gamma) {
  check_bld(grad_in, kOp, "grad", /*allow_half=*/true);
  check_q_sample_schedule(grad_in, sqrt_ab_in, sqrt_1mab_in, uniform_in, gamma, kOp);
  TORCH_CHECK(mask_in.scalar_type() == at::kBool && mask_in.dim() == 2 && mask_in.size(0) == grad_in.size(0) &&
                  mask_in.size(1) == grad_in.size(1),
              kOp, ": target_mask must be bool (B, L) = (", grad_in.size(0), ", ", grad_in.size(1), "), got ",
              mask_in.scalar_type(), " ", mask_in.sizes());
  check_devices(grad_in, mask_in, sqrt_ab_in, sqrt_1mab_in, uniform_in, "grad");
  const CudaOpGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous(), mask = mask_in.contiguous();
  const at::Tensor sab = sqrt_ab_in.contiguous(), s1 = sqrt_1mab_in.contiguous(), uniform = uniform_in.contiguous();
  const int64_t B = grad.size(0), L = grad.size(1), d = grad.size(2);
  at::Tensor grad_x0 = at::empty_like(grad);
  at::Tensor grad_m = at::empty({d}, grad.options().dtype(at::kFloat));
  at::Tensor partial = at::empty({soft_absorb_backward_splits(B * L), d}, grad.options().dtype(at::kFloat));
  SoftAbsorbQSampleBackwardParams p;
  p.dtype = kernel_dtype(grad, kOp);
  p.batch = B;
  p.seqlen = L;
  p.dim = d;
  p.gamma = static_cast<float>(gamma);
  p.grad = grad.data_ptr();
  p.target_mask = mask.data_ptr<bool>();
  p.sqrt_ab = sab.data_ptr<float>();
  p.sqrt_1mab = s1.data_ptr<float>();
  p.uniform = uniform.data_ptr<float>();
  p.grad_x0 = grad_x0.data_ptr();
  p.grad_m = grad_m.data_ptr<float>();
  p.partial = partial.data_ptr<float>();
  C10_CUDA_CHECK(launch_soft_absorb_q_sample_backward(p, at::cuda::getCurrentCUDAStream()));
  return {grad_x0, grad_m};
}

}  // namespace

TORCH_LIBRARY_IMPL(moediffuseq, CUDA, m) {
  m.impl("soft_absorb_q_sample", &soft_absorb_q_sample_cuda);
  m.impl("soft_absorb_q_sample_backward", &soft_absorb_q_sample_backward_cuda);
}

}  // namespace moediffuseq::cuda
