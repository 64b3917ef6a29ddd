// Input validation of the MoE ops (moe_topk_softmax, moe_ffn, moe_ffn_backward), shared by
// every backend's host entry point. `allow_half`: the backend also takes float16 (CUDA).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>
#include <utility>

#include "moe/moe_params.h"

namespace moediffuseq {

inline MoeActivation parse_moe_activation(const std::string& name, const char* op) {
  if (name == "gelu") return MoeActivation::kGelu;
  if (name == "silu") return MoeActivation::kSilu;
  if (name == "swiglu") return MoeActivation::kSwiglu;
  TORCH_CHECK(false, op, ": activation must be \"gelu\", \"silu\" or \"swiglu\", got \"", name, "\"");
}

inline void check_moe_topk_inputs(const at::Tensor& logits, int64_t k) {
  TORCH_CHECK(logits.dim() == 2, "moe_topk_softmax: logits must be (T, E), got shape ", logits.sizes());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()),
              "moe_topk_softmax: logits must be a floating tensor, got ", logits.scalar_type());
  const int64_t E = logits.size(1);
  TORCH_CHECK(E >= 1, "moe_topk_softmax: logits need at least one expert column, got shape ", logits.sizes());
  TORCH_CHECK(k >= 1 && k <= E, "moe_topk_softmax: k must be in [1, E] = [1, ", E, "], got ", k);
}

struct MoeShapes {
  int64_t T, D, k, E, F1, F;
};

inline MoeShapes check_moe_inputs(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& indices,
                                  const at::Tensor& w1, const at::Tensor& w2, bool swiglu, const char* op,
                                  bool allow_half = false) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be (T, D), got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                  (allow_half && x.scalar_type() == at::kHalf),
              op, ": x must be float32 or bfloat16", allow_half ? " (or float16)" : "", ", got ", x.scalar_type());
  const int64_t T = x.size(0), D = x.size(1);
  TORCH_CHECK(indices.dim() == 2 && indices.size(0) == T, op, ": indices must be (T, k) with T = ", T,
              ", got shape ", indices.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong, op, ": indices must be int64, got ", indices.scalar_type());
  const int64_t k = indices.size(1);
  TORCH_CHECK(weights.sizes() == indices.sizes(), op, ": weights must be (T, k) = ", indices.sizes(),
              " like indices, got ", weights.sizes());
  TORCH_CHECK(weights.scalar_type() == at::kFloat, op, ": weights must be float32, got ", weights.scalar_type());
  TORCH_CHECK(w1.dim() == 3 && w1.size(1) == D, op, ": w1 must be (E, D, F) with D = ", D, ", got shape ",
              w1.sizes());
  const int64_t E = w1.size(0), F1 = w1.size(2);
  const int64_t F = swiglu ? F1 / 2 : F1;
  TORCH_CHECK(!swiglu || F1 % 2 == 0, op,
              ": with swiglu, w1 must be (E, D, 2F) (gate and up halves), got odd width ", F1);
  TORCH_CHECK(w2.dim() == 3 && w2.size(0) == E && w2.size(1) == F && w2.size(2) == D, op,
              ": w2 must be (E, F, D) = (", E, ", ", F, ", ", D, "), got shape ", w2.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"w1", &w1}, {"w2", &w2}}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": ", name, " must have the dtype of x (",
                x.scalar_type(), "), got ", t->scalar_type());
  }
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"weights", &weights},
                                {"indices", &indices}, {"w1", &w1}, {"w2", &w2}}) {
    TORCH_CHECK(t->device() == x.device(), op, ": ", name, " must be on the device of x (", x.device(), "), got ",
                t->device());
  }
  return {T, D, k, E, F1, F};
}

// The extra inputs of moe_ffn_backward: grad_y like x, the saved hidden (T*k, F1) and
// expert_out (T*k, D).
inline void check_moe_backward_inputs(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& hidden,
                                      const at::Tensor& expert_out, const MoeShapes& s, const char* op) {
  const int64_t N = s.T * s.k;
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type(), op, ": grad_y must match x ",
              x.sizes(), " ", x.scalar_type(), ", got ", grad_y.sizes(), " ", grad_y.scalar_type());
  TORCH_CHECK(hidden.dim() == 2 && hidden.size(0) == N && hidden.size(1) == s.F1, op,
              ": hidden must be (T*k, F1) = (", N, ", ", s.F1, "), got ", hidden.sizes());
  TORCH_CHECK(expert_out.dim() == 2 && expert_out.size(0) == N && expert_out.size(1) == s.D, op,
              ": expert_out must be (T*k, D) = (", N, ", ", s.D, "), got ", expert_out.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"grad_y", &grad_y},
                                {"hidden", &hidden}, {"expert_out", &expert_out}}) {
    TORCH_CHECK(t->device() == x.device(), op, ": ", name, " must be on the device of x (", x.device(), "), got ",
                t->device());
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": ", name, " must have the dtype of x (",
                x.scalar_type(), "), got ", t->scalar_type());
  }
}

}  // namespace moediffuseq
