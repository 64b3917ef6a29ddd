// Input validation shared by the diffusion ops (soft_absorb_q_sample, denoise_step,
// nearest_embedding) and their backends. `allow_half`: the backend also takes float16 (CUDA).
#pragma once

#include <ATen/core/Tensor.h>

namespace moediffuseq {

// x: (B, L, d) float32 or bfloat16 (or float16 when allowed).
inline void check_bld(const at::Tensor& x, const char* op, const char* name, bool allow_half = false) {
  TORCH_CHECK(x.dim() == 3, op, ": ", name, " must be (B, L, d), got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                  (allow_half && x.scalar_type() == at::kHalf),
              op, ": ", name, " must be float32 or bfloat16", allow_half ? " (or float16)" : "", ", got ",
              x.scalar_type());
}

// t is on the device of ref (the backends read every input on the device of x).
inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the device of ", ref_name, " (",
              ref.device(), "), got ", t.device());
}

// t has exactly the shape, dtype and device of ref.
inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                       const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " must have the shape of ", ref_name, " ", ref.sizes(),
              ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
  check_same_device(t, ref, op, name, ref_name);
}

// target_mask: bool (B, L) for x (B, L, d).
inline void check_target_mask(const at::Tensor& x, const at::Tensor& target_mask, const char* op) {
  TORCH_CHECK(target_mask.scalar_type() == at::kBool && target_mask.dim() == 2 &&
                  target_mask.size(0) == x.size(0) && target_mask.size(1) == x.size(1),
              op, ": target_mask must be bool (B, L) = (", x.size(0), ", ", x.size(1), "), got ",
              target_mask.scalar_type(), " ", target_mask.sizes());
  check_same_device(target_mask, x, op, "target_mask", "x");
}

// m: (d) in the dtype of x, on its device.
inline void check_m(const at::Tensor& x, const at::Tensor& m, const char* op) {
  TORCH_CHECK(m.dim() == 1 && m.size(0) == x.size(2) && m.scalar_type() == x.scalar_type(), op,
              ": m must be (d,) = (", x.size(2), ",) in the dtype of x (", x.scalar_type(), "), got ",
              m.scalar_type(), " ", m.sizes());
  check_same_device(m, x, op, "m", "x");
}

// A per-batch coefficient of x (B, L, d): float32 (B), on the device of x.
inline void check_per_batch(const at::Tensor& c, const at::Tensor& x, const char* op, const char* name) {
  const int64_t B = x.size(0);
  TORCH_CHECK(c.scalar_type() == at::kFloat && c.dim() == 1 && c.size(0) == B, op, ": ", name,
              " must be float32 (B,) = (", B, ",), got ", c.scalar_type(), " ", c.sizes());
  check_same_device(c, x, op, name, "x");
}

// The per-position schedule inputs of soft_absorb_q_sample and its backward, for x (B, L, d).
inline void check_q_sample_schedule(const at::Tensor& x, const at::Tensor& sqrt_ab, const at::Tensor& sqrt_1mab,
                                    const at::Tensor& uniform, double gamma, const char* op) {
  const int64_t B = x.size(0), L = x.size(1);
  check_per_batch(sqrt_ab, x, op, "sqrt_ab");
  check_per_batch(sqrt_1mab, x, op, "sqrt_1mab");
  TORCH_CHECK(uniform.scalar_type() == at::kFloat && uniform.dim() == 2 && uniform.size(0) == B &&
                  uniform.size(1) == L,
              op, ": uniform must be float32 (B, L) = (", B, ", ", L, "), got ", uniform.scalar_type(), " ",
              uniform.sizes());
  check_same_device(uniform, x, op, "uniform", "x");
  TORCH_CHECK(gamma >= 0.0 && gamma <= 1.0, op, ": gamma must be in [0, 1], got ", gamma);
}

// nearest_embedding: x (N, d) and emb (V, d), V >= 1, float32 or bfloat16 (or float16), one device.
inline void check_nearest_embedding_inputs(const at::Tensor& x, const at::Tensor& emb, bool allow_half = false) {
  TORCH_CHECK(x.dim() == 2, "nearest_embedding: x must be (N, d), got shape ", x.sizes());
  TORCH_CHECK(emb.dim() == 2 && emb.size(1) == x.size(1), "nearest_embedding: emb must be (V, d) with d = ",
              x.size(1), ", got shape ", emb.sizes());
  TORCH_CHECK(emb.size(0) >= 1, "nearest_embedding: emb must have at least one row");
  TORCH_CHECK(x.size(1) >= 1, "nearest_embedding: the embedding width d must be >= 1 (every distance would be 0), "
              "got x ", x.sizes(), " and emb ", emb.sizes());
  for (const auto* t : {&x, &emb}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16 ||
                    (allow_half && t->scalar_type() == at::kHalf),
                "nearest_embedding: x and emb must be float32 or bfloat16", allow_half ? " (or float16)" : "",
                ", got ", t->scalar_type());
  }
  TORCH_CHECK(x.device() == emb.device(), "nearest_embedding: emb must be on the device of x (", x.device(),
              "), got ", emb.device());
}

}  // namespace moediffuseq
