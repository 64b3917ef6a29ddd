// moe_topk_softmax: the one host entry of every backend (kernels: moe/moe_backend.h). Per token,
// the k experts with the largest logits (ties: the lowest expert index) and their softmax
// weights renormalised over the k chosen, which equals a softmax over the chosen logits. The
// kernel reports NaN / +inf rows as the lowest such row; reading it back is one 8-byte copy
// (on CUDA it synchronises with the stream), and the error is raised here, by name.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

#include "common/backends.h"
#include "common/kernel_dtype.h"
#include "moe/moe_backend.h"
#include "moe/moe_checks.h"

namespace moediffuseq {
namespace {

std::tuple<at::Tensor, at::Tensor> moe_topk_softmax(const at::Tensor& logits_in, int64_t k) {
  const char* op = "moe_topk_softmax";
  check_moe_topk_inputs(logits_in, k);
  const MoeKernels& kernels = kernels_for<MoeKernels>(logits_in.device(), op);
  const OpDeviceGuard guard(logits_in.device());
  at::Tensor logits = logits_in.contiguous();
  const auto st = logits.scalar_type();
  if (st != at::kFloat && st != at::kBFloat16 && st != at::kHalf) {
    logits = logits.to(at::kFloat);  // the math is float32 for every dtype
  }
  const int64_t T = logits.size(0), E = logits.size(1);
  at::Tensor weights = at::empty({T, k}, logits.options().dtype(at::kFloat));
  at::Tensor indices = at::empty({T, k}, logits.options().dtype(at::kLong));
  constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  at::Tensor bad_row = at::full({1}, kNone, logits.options().dtype(at::kLong));

  MoeTopkSoftmaxParams p;
  p.dtype = kernel_dtype(logits, op);
  p.tokens = T;
  p.num_experts = static_cast<int>(E);
  p.k = static_cast<int>(k);
  p.logits = logits.data_ptr();
  p.weights = weights.data_ptr<float>();
  p.indices = indices.data_ptr<int64_t>();
  p.bad_row = bad_row.data_ptr<int64_t>();
  kernels.topk_softmax(p);
  const int64_t bad = bad_row.item<int64_t>();
  TORCH_CHECK(bad == kNone, op, ": logits contain NaN or +inf (row ", bad, ")");
  return {weights, indices};
}

}  // namespace

MOEDIFFUSEQ_IMPL_CPU_AND_CUDA(m.impl("moe_topk_softmax", &moe_topk_softmax);)

}  // namespace moediffuseq
