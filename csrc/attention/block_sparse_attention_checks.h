// Input validation and kernel parameters of block_sparse_attention, shared by every backend's
// host entry point.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string>
#include <utility>

#include "attention/block_sparse_attention_params.h"

namespace moediffuseq {

// Memory layout of q, k, v (and of the output and gradients, which follow their input).
enum class BsaLayout { kBHLD, kBLHD };

inline BsaLayout parse_bsa_layout(c10::string_view layout) {
  if (layout == "bhld") return BsaLayout::kBHLD;
  TORCH_CHECK(layout == "blhd", "block_sparse_attention: layout must be \"bhld\" ((B, H, L, D) tensors) or "
              "\"blhd\" ((B, L, H, D) tensors), got \"", layout, "\"");
  return BsaLayout::kBLHD;
}

// The shape a tensor must have in `layout`, for messages: heads = "H" (queries) or "H_kv".
inline std::string bsa_shape_name(BsaLayout layout, const char* heads) {
  return layout == BsaLayout::kBHLD ? std::string("(B, ") + heads + ", L, D)" : std::string("(B, L, ") + heads + ", D)";
}

inline const char* bsa_layout_name(BsaLayout layout) { return layout == BsaLayout::kBHLD ? "bhld" : "blhd"; }

// The logical (B, H, L, D) view of a tensor in `layout` (a view, never a copy).
inline at::Tensor bsa_logical(const at::Tensor& t, BsaLayout layout) {
  return layout == BsaLayout::kBLHD ? t.transpose(1, 2) : t;
}

// A tensor whose last dimension is contiguous (the kernels' only requirement on strides):
// itself when it already is, else a contiguous copy.
inline at::Tensor bsa_rows_contiguous(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

inline BsaStrides bsa_strides(const at::Tensor& logical) {
  return BsaStrides{logical.stride(0), logical.stride(1), logical.stride(2)};
}

// A tensor of the shape of `like` (same layout): grad_out and out against q.
inline void check_bsa_tensor(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name,
                             BsaLayout layout) {
  TORCH_CHECK(t.sizes() == like.sizes(), "block_sparse_attention: ", name, " must have the shape of ", like_name,
              " ", like.sizes(), " (layout \"", bsa_layout_name(layout), "\"), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "block_sparse_attention: ", name, " must have the dtype of ",
              like_name, " (", like.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "block_sparse_attention: ", name, " must be on the device of ",
              like_name, " (", like.device(), "), got ", t.device());
}

inline void check_bsa_mask(const std::optional<at::Tensor>& mask, const char* name, int64_t B, int64_t L,
                           const at::Tensor& q) {
  if (!mask.has_value()) return;
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.scalar_type() == at::kBool, "block_sparse_attention: ", name,
              " must be a bool tensor of shape (B, L) = (", B, ", ", L, "), got dtype ", m.scalar_type());
  TORCH_CHECK(m.dim() == 2 && m.size(0) == B && m.size(1) == L, "block_sparse_attention: ", name,
              " must have shape (B, L) = (", B, ", ", L, "), got ", m.sizes());
  TORCH_CHECK(m.device() == q.device(), "block_sparse_attention: ", name, " must be on the device of q (",
              q.device(), "), got ", m.device());
}

// Checks q, k, v in `layout`, the masks, the source lengths and the integer arguments. q is
// (B, H, L_q, D) or (B, L_q, H, D); k and v have H_kv heads (H a multiple of H_kv: grouped-query
// attention) and L_k >= L_q rows; q's rows are the key positions [query_offset, query_offset + L_q).
inline void check_bsa_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window,
                             int64_t dilation, const std::optional<at::Tensor>& global_mask,
                             const std::optional<at::Tensor>& key_padding_mask, double scale, BsaLayout layout,
                             const std::optional<at::Tensor>& source_lengths, int64_t query_offset) {
  const std::string q_shape = bsa_shape_name(layout, "H"), kv_shape = bsa_shape_name(layout, "H_kv");
  const char* layout_name = bsa_layout_name(layout);
  TORCH_CHECK(q.dim() == 4, "block_sparse_attention: q must be ", q_shape, " (layout \"", layout_name,
              "\"), got shape ", q.sizes());
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
  const at::Tensor ql = bsa_logical(q, layout);
  const int64_t B = ql.size(0), H = ql.size(1), Lq = ql.size(2), D = ql.size(3);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"k", &k}, {"v", &v}}) {
    TORCH_CHECK(t->dim() == 4, "block_sparse_attention: ", name, " must be ", kv_shape, " (layout \"", layout_name,
                "\"), got shape ", t->sizes());
    const at::Tensor tl = bsa_logical(*t, layout);
    TORCH_CHECK(tl.size(0) == B && tl.size(3) == D, "block_sparse_attention: ", name, " must be ", kv_shape,
                " with the B and D of q ", q.sizes(), " (layout \"", layout_name,
                "\"; both tensors in the same layout), got ", t->sizes());
    TORCH_CHECK(tl.size(2) >= Lq, "block_sparse_attention: ", name, " must be ", kv_shape, " with L >= L_q = ", Lq,
                ", the query rows of q ", q.sizes(), " (layout \"", layout_name,
                "\"; both tensors in the same layout; q's rows are key positions "
                "[query_offset, query_offset + L_q)), got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "block_sparse_attention: ", name,
                " must have the dtype of q (", q.scalar_type(), "), got ", t->scalar_type());
    TORCH_CHECK(t->device() == q.device(), "block_sparse_attention: ", name, " must be on the device of q (",
                q.device(), "), got ", t->device());
  }
  TORCH_CHECK(v.sizes() == k.sizes(), "block_sparse_attention: v must have the shape of k ", k.sizes(), ", got ",
              v.sizes());
  const int64_t Hkv = bsa_logical(k, layout).size(1);
  TORCH_CHECK(Hkv > 0 ? H % Hkv == 0 : H == 0, "block_sparse_attention: the query heads H = ", H,
              " must be a multiple of the key/value heads H_kv = ", Hkv,
              " (grouped-query attention: query head h reads key/value head h / (H / H_kv)); q ", q.sizes(),
              ", k ", k.sizes(), " (layout \"", layout_name, "\")");
  TORCH_CHECK(window >= 0, "block_sparse_attention: window must be >= 0, got ", window);
  TORCH_CHECK(dilation >= 1, "block_sparse_attention: dilation must be >= 1, got ", dilation);
  TORCH_CHECK(std::isfinite(scale), "block_sparse_attention: scale must be finite, got ", scale);
  const int64_t L = bsa_logical(k, layout).size(2);
  TORCH_CHECK(query_offset >= 0, "block_sparse_attention: query_offset must be >= 0, got ", query_offset);
  TORCH_CHECK(query_offset <= L - Lq, "block_sparse_attention: query_offset + L_q must be <= L (the key length): "
              "q's rows are key positions [query_offset, query_offset + L_q), got query_offset = ", query_offset,
              ", L_q = ", Lq, ", L = ", L);
  check_bsa_mask(global_mask, "global_mask", B, L, q);
  check_bsa_mask(key_padding_mask, "key_padding_mask", B, L, q);
  if (source_lengths.has_value()) {
    const at::Tensor& s = *source_lengths;
    TORCH_CHECK(s.scalar_type() == at::kLong && s.dim() == 1 && s.size(0) == B,
                "block_sparse_attention: source_lengths must be an int64 tensor of shape (B,) = (", B,
                ",), got dtype ", s.scalar_type(), " and shape ", s.sizes());
    TORCH_CHECK(s.device() == q.device(), "block_sparse_attention: source_lengths must be on the device of q (",
                q.device(), "), got ", s.device());
    if (B > 0) {
      // one reduction and one copy to the host (a synchronisation on CUDA)
      const at::Tensor range = at::stack({s.min(), s.max()}).cpu();
      const int64_t lo = range[0].item<int64_t>(), hi = range[1].item<int64_t>();
      TORCH_CHECK(lo >= 0 && hi <= L, "block_sparse_attention: source_lengths must lie in [0, L] = [0, ", L,
                  "] (positions [0, S_b) of batch b are its source), got values in [", lo, ", ", hi, "]");
    }
  }
}

// The saved log-sum-exp of the forward, an input of the backward: float32 (B, H, L_q) beside q.
// q is the logical (B, H, L, D) view.
inline void check_bsa_lse(const at::Tensor& lse, const at::Tensor& q) {
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == q.size(0) &&
                  lse.size(1) == q.size(1) && lse.size(2) == q.size(2) && lse.device() == q.device(),
              "block_sparse_attention_backward: lse must be float32 (B, H, L_q) = (", q.size(0), ", ", q.size(1),
              ", ", q.size(2), ") on ", q.device(), ", got ", lse.scalar_type(), " ", lse.sizes(), " on ",
              lse.device());
}

inline std::optional<at::Tensor> contiguous_mask(const std::optional<at::Tensor>& mask) {
  return mask ? std::optional<at::Tensor>(mask->contiguous()) : std::nullopt;
}

// Sizes, window, scale, the (contiguous) masks and source lengths of a call; the tensor pointers
// are the caller's.
// Window and dilation are saturated at L (clamp_window_and_dilation): any int64 value is exact.
// q and k are the logical (B, H, L, D) views; the strides are the caller's.
inline BlockSparseAttentionParams make_bsa_params(const at::Tensor& q, const at::Tensor& k, int64_t window,
                                                  int64_t dilation, const std::optional<at::Tensor>& global_mask,
                                                  const std::optional<at::Tensor>& key_padding_mask, double scale,
                                                  bool causal, const std::optional<at::Tensor>& source_lengths,
                                                  int64_t query_offset) {
  BlockSparseAttentionParams p;
  p.batch = q.size(0);
  p.heads = q.size(1);
  p.kv_heads = k.size(1);
  p.causal = causal;
  p.seqlen = k.size(2);
  p.q_len = q.size(2);
  p.query_offset = query_offset;
  p.head_dim = q.size(3);
  p.window = window;
  p.dilation = dilation;
  clamp_window_and_dilation(p);
  p.scale = static_cast<float>(scale);
  p.global_mask = global_mask ? global_mask->data_ptr<bool>() : nullptr;
  p.key_padding_mask = key_padding_mask ? key_padding_mask->data_ptr<bool>() : nullptr;
  p.source_lengths = source_lengths ? source_lengths->data_ptr<int64_t>() : nullptr;
  return p;
}

// The forward's tensors (logical (B, H, L, D) views; lse (B, H, L_q) contiguous): pointers and strides.
inline void set_bsa_forward_tensors(BlockSparseAttentionParams& p, const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse) {
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out_mut = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.q_strides = bsa_strides(q);
  p.k_strides = bsa_strides(k);
  p.v_strides = bsa_strides(v);
  p.out_strides = bsa_strides(out);
}

// The backward's tensors, the same way: the forward's inputs and outputs, grad_out and the gradients.
inline void set_bsa_backward_tensors(BlockSparseAttentionParams& p, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                     const at::Tensor& grad_out, const at::Tensor& grad_q, const at::Tensor& grad_k,
                                     const at::Tensor& grad_v) {
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = const_cast<float*>(lse.data_ptr<float>());
  p.grad_out = grad_out.data_ptr();
  p.grad_q = grad_q.data_ptr();
  p.grad_k = grad_k.data_ptr();
  p.grad_v = grad_v.data_ptr();
  p.q_strides = bsa_strides(q);
  p.k_strides = bsa_strides(k);
  p.v_strides = bsa_strides(v);
  p.out_strides = bsa_strides(out);
  p.grad_out_strides = bsa_strides(grad_out);
  p.grad_q_strides = bsa_strides(grad_q);
  p.grad_k_strides = bsa_strides(grad_k);
  p.grad_v_strides = bsa_strides(grad_v);
}

}  // namespace moediffuseq
