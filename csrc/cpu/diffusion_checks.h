// Input validation shared by the diffusion ops (soft_absorb_q_sample, denoise_step).
#pragma once

#include <ATen/core/Tensor.h>

namespace moediffuseq {

// x: (B, L, d) float32 or bfloat16.
inline void check_bld(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.dim() == 3, op, ": ", name, " must be (B, L, d), got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op, ": ", name,
              " must be float32 or bfloat16, got ", x.scalar_type());
}

// t has exactly the shape and dtype of ref.
inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                       const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " must have the shape of ", ref_name, " ", ref.sizes(),
              ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the device of ", ref_name, " (",
              ref.device(), "), got ", t.device());
}

// target_mask: bool (B, L); m: (d) in the dtype of x; per-batch coefficients: float32 (B).
inline void check_mask_and_m(const at::Tensor& x, const at::Tensor& target_mask, const at::Tensor& m,
                             const char* op) {
  TORCH_CHECK(target_mask.scalar_type() == at::kBool && target_mask.dim() == 2 &&
                  target_mask.size(0) == x.size(0) && target_mask.size(1) == x.size(1),
              op, ": target_mask must be bool (B, L) = (", x.size(0), ", ", x.size(1), "), got ",
              target_mask.scalar_type(), " ", target_mask.sizes());
  TORCH_CHECK(m.dim() == 1 && m.size(0) == x.size(2) && m.scalar_type() == x.scalar_type(), op,
              ": m must be (d,) = (", x.size(2), ",) in the dtype of x (", x.scalar_type(), "), got ",
              m.scalar_type(), " ", m.sizes());
}

inline void check_per_batch(const at::Tensor& c, int64_t B, const char* op, const char* name) {
  TORCH_CHECK(c.scalar_type() == at::kFloat && c.dim() == 1 && c.size(0) == B, op, ": ", name,
              " must be float32 (B,) = (", B, ",), got ", c.scalar_type(), " ", c.sizes());
}

}  // namespace moediffuseq
