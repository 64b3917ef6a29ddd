// CUDA moe_topk_softmax: the torch-facing half (checks, device guard, current stream). The
// kernel (moe_routing.cu) reports NaN / +inf rows through a device-side minimum; reading it
// back is one 8-byte copy, which synchronises with the stream: the error is raised here, by
// name, as on the CPU.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <limits>

#include "common/cuda/device_check.h"
#include "common/kernel_dtype.h"
#include "moe/cuda/moe_kernels.h"
#include "moe/moe_checks.h"

namespace moediffuseq::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> moe_topk_softmax_cuda(const at::Tensor& logits_in, int64_t k) {
  check_moe_topk_inputs(logits_in, k);
  const CudaOpGuard guard(logits_in.device());
  at::Tensor logits = logits_in.contiguous();
  const auto st = logits.scalar_type();
  if (st != at::kFloat && st != at::kBFloat16 && st != at::kHalf) {
    logits = logits.to(at::kFloat);  // the math is float32 for every dtype, as on the CPU
  }
  const int64_t T = logits.size(0), E = logits.size(1);
  at::Tensor weights = at::empty({T, k}, logits.options().dtype(at::kFloat));
  at::Tensor indices = at::empty({T, k}, logits.options().dtype(at::kLong));
  constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  at::Tensor bad_row = at::full({1}, kNone, logits.options().dtype(at::kLong));

  MoeTopkSoftmaxParams p;
  p.dtype = kernel_dtype(logits, "moe_topk_softmax");
  p.tokens = T;
  p.num_experts = static_cast<int>(E);
  p.k = static_cast<int>(k);
  p.logits = logits.data_ptr();
  p.weights = weights.data_ptr<float>();
  p.indices = indices.data_ptr<int64_t>();
  p.bad_row = bad_row.data_ptr<int64_t>();
  C10_CUDA_CHECK(launch_moe_topk_softmax(p, at::cuda::getCurrentCUDAStream()));
  const int64_t bad = bad_row.item<int64_t>();
  TORCH_CHECK(bad == kNone, "moe_topk_softmax: logits contain NaN or +inf (row ", bad, ")");
  return {weights, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(moediffuseq, CUDA, m) { m.impl("moe_topk_softmax", &moe_topk_softmax_cuda); }

}  // namespace moediffuseq::cuda
