// Input validation and kernel parameters of block_sparse_attention, shared by every backend's
// host entry point.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Optional.h>

#include <optional>
#include <string>

#include "common/block_sparse_attention_params.h"

namespace moediffuseq {

inline void check_bsa_tensor(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.dim() == 4, "block_sparse_attention: ", name, " must be (B, H, L, D), got shape ",
              t.sizes());
  TORCH_CHECK(t.sizes() == q.sizes(), "block_sparse_attention: ", name, " must have the shape of q ",
              q.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "block_sparse_attention: ", name,
              " must have the dtype of q (", q.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == q.device(), "block_sparse_attention: ", name, " must be on the device of q (",
              q.device(), "), got ", t.device());
}

inline void check_bsa_mask(const std::optional<at::Tensor>& mask, const char* name, const at::Tensor& q) {
  if (!mask.has_value()) return;
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.scalar_type() == at::kBool, "block_sparse_attention: ", name,
              " must be a bool tensor of shape (B, L) = (", q.size(0), ", ", q.size(2), "), got dtype ",
              m.scalar_type());
  TORCH_CHECK(m.dim() == 2 && m.size(0) == q.size(0) && m.size(1) == q.size(2), "block_sparse_attention: ",
              name, " must have shape (B, L) = (", q.size(0), ", ", q.size(2), "), got ", m.sizes());
  TORCH_CHECK(m.device() == q.device(), "block_sparse_attention: ", name, " must be on the device of q (",
              q.device(), "), got ", m.device());
}

// Checks q, k, v (and any extra (B, H, L, D) tensors through check_bsa_tensor), masks and
// the integer arguments.
inline void check_bsa_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window,
                             int64_t dilation, const std::optional<at::Tensor>& global_mask,
                             const std::optional<at::Tensor>& key_padding_mask, double scale) {
  TORCH_CHECK(q.dim() == 4, "block_sparse_attention: q must be (B, H, L, D), got shape ", q.sizes());
  if (q.is_cuda()) {
    // The CUDA kernels run on bfloat16 / float16 tensor cores (float32 accumulation); the
    // message names the two ways a float32 model gets there.
    TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
                "block_sparse_attention (CUDA): q is ", c10::getDtypeNames(q.scalar_type()).first,
                "; the CUDA kernels run in bfloat16/float16: run under torch.autocast('cuda', "
                "dtype=torch.bfloat16) or cast the model (generation: --dtype bf16)");
  } else {
    TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
                "block_sparse_attention: q, k, v must be float32 or bfloat16, got ", q.scalar_type());
  }
  TORCH_CHECK(q.size(3) > 0, "block_sparse_attention: head dimension D must be positive, got q shape ",
              q.sizes());
  check_bsa_tensor(k, "k", q);
  check_bsa_tensor(v, "v", q);
  TORCH_CHECK(window >= 0, "block_sparse_attention: window must be >= 0, got ", window);
  TORCH_CHECK(dilation >= 1, "block_sparse_attention: dilation must be >= 1, got ", dilation);
  TORCH_CHECK(std::isfinite(scale), "block_sparse_attention: scale must be finite, got ", scale);
  check_bsa_mask(global_mask, "global_mask", q);
  check_bsa_mask(key_padding_mask, "key_padding_mask", q);
}

// The saved log-sum-exp of the forward, an input of the backward: float32 (B, H, L) beside q.
inline void check_bsa_lse(const at::Tensor& lse, const at::Tensor& q) {
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == q.size(0) &&
                  lse.size(1) == q.size(1) && lse.size(2) == q.size(2) && lse.device() == q.device(),
              "block_sparse_attention_backward: lse must be float32 (B, H, L) = (", q.size(0), ", ", q.size(1),
              ", ", q.size(2), ") on ", q.device(), ", got ", lse.scalar_type(), " ", lse.sizes(), " on ",
              lse.device());
}

inline std::optional<at::Tensor> contiguous_mask(const std::optional<at::Tensor>& mask) {
  return mask ? std::optional<at::Tensor>(mask->contiguous()) : std::nullopt;
}

// Sizes, window, scale and the (contiguous) masks of a call; the tensor pointers are the caller's.
// Window and dilation are saturated at L (clamp_window_and_dilation): any int64 value is exact.
inline BlockSparseAttentionParams make_bsa_params(const at::Tensor& q, int64_t window, int64_t dilation,
                                                  const std::optional<at::Tensor>& global_mask,
                                                  const std::optional<at::Tensor>& key_padding_mask, double scale) {
  BlockSparseAttentionParams p;
  p.batch = q.size(0);
  p.heads = q.size(1);
  p.seqlen = q.size(2);
  p.head_dim = q.size(3);
  p.window = window;
  p.dilation = dilation;
  clamp_window_and_dilation(p);
  p.scale = static_cast<float>(scale);
  p.global_mask = global_mask ? global_mask->data_ptr<bool>() : nullptr;
  p.key_padding_mask = key_padding_mask ? key_padding_mask->data_ptr<bool>() : nullptr;
  return p;
}

}  // namespace moediffuseq
