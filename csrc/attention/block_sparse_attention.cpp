// The one host entry of block_sparse_attention and its backward, for every backend: checks,
// layouts and strides, output allocation and the params, then the kernels of the device's
// backend (BsaKernels, attention/block_sparse_attention_backend.h). Outputs and gradients are
// allocated contiguous in their input's layout ("bhld" or "blhd"). q may be a run of the query
// rows (L_q <= L_k, at query_offset) and source_lengths isolates each batch's source.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "attention/block_sparse_attention_backend.h"
#include "attention/block_sparse_attention_checks.h"
#include "common/backends.h"

namespace moediffuseq {
namespace {

std::tuple<at::Tensor, at::Tensor> block_sparse_attention(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, int64_t window, int64_t dilation,
    const std::optional<at::Tensor>& global_mask_in, const std::optional<at::Tensor>& key_padding_mask_in,
    double scale, bool causal, c10::string_view layout_name, const std::optional<at::Tensor>& source_lengths_in,
    int64_t query_offset) {
  const BsaKernels& kernels = kernels_for<BsaKernels>(q_in.device(), "block_sparse_attention");
  const BsaLayout layout = parse_bsa_layout(layout_name);
  check_bsa_inputs(q_in, k_in, v_in, window, dilation, global_mask_in, key_padding_mask_in, scale, layout,
                   source_lengths_in, query_offset);
  kernels.check(bsa_logical(q_in, layout), bsa_logical(k_in, layout));
  const OpDeviceGuard guard(q_in.device());
  // logical (B, H, L, D) views of the caller's memory wherever the kernels can read it
  const at::Tensor q = bsa_logical(kernels.readable(q_in), layout);
  const at::Tensor k = bsa_logical(kernels.readable(k_in), layout);
  const at::Tensor v = bsa_logical(kernels.readable(v_in), layout);
  const auto global_mask = contiguous_mask(global_mask_in), key_padding_mask = contiguous_mask(key_padding_mask_in);
  const auto source_lengths = contiguous_mask(source_lengths_in);
  const at::Tensor out_mem = at::empty(q_in.sizes(), q_in.options().memory_format(at::MemoryFormat::Contiguous));
  const at::Tensor out = bsa_logical(out_mem, layout);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out_mem, lse};
  BlockSparseAttentionParams p = make_bsa_params(q, k, window, dilation, global_mask, key_padding_mask, scale, causal,
                                                 source_lengths, query_offset);
  set_bsa_forward_tensors(p, q, k, v, out, lse);
  kernels.forward(p, q);
  return {out_mem, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_sparse_attention_backward(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, int64_t window, int64_t dilation,
    const std::optional<at::Tensor>& global_mask_in, const std::optional<at::Tensor>& key_padding_mask_in,
    double scale, bool causal, c10::string_view layout_name, const std::optional<at::Tensor>& source_lengths_in,
    int64_t query_offset) {
  const BsaKernels& kernels = kernels_for<BsaKernels>(q_in.device(), "block_sparse_attention_backward");
  const BsaLayout layout = parse_bsa_layout(layout_name);
  check_bsa_inputs(q_in, k_in, v_in, window, dilation, global_mask_in, key_padding_mask_in, scale, layout,
                   source_lengths_in, query_offset);
  check_bsa_tensor(grad_out_in, "grad_out", q_in, "q", layout);
  check_bsa_tensor(out_in, "out", q_in, "q", layout);
  check_bsa_lse(lse_in, bsa_logical(q_in, layout));
  kernels.check(bsa_logical(q_in, layout), bsa_logical(k_in, layout));
  const OpDeviceGuard guard(q_in.device());
  const auto logical = [&](const at::Tensor& t) { return bsa_logical(kernels.readable(t), layout); };
  const at::Tensor q = logical(q_in), k = logical(k_in), v = logical(v_in);
  const at::Tensor grad_out = logical(grad_out_in), out = logical(out_in);
  const at::Tensor lse = lse_in.contiguous();
  const auto global_mask = contiguous_mask(global_mask_in), key_padding_mask = contiguous_mask(key_padding_mask_in);
  const auto source_lengths = contiguous_mask(source_lengths_in);
  const auto like = [](const at::Tensor& t) {
    return at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous));
  };
  at::Tensor grad_q_mem = like(q_in), grad_k_mem = like(k_in), grad_v_mem = like(v_in);
  if (q.numel() == 0) return {grad_q_mem, grad_k_mem.zero_(), grad_v_mem.zero_()};
  const at::Tensor grad_q = bsa_logical(grad_q_mem, layout), grad_k = bsa_logical(grad_k_mem, layout),
                   grad_v = bsa_logical(grad_v_mem, layout);
  BlockSparseAttentionParams p = make_bsa_params(q, k, window, dilation, global_mask, key_padding_mask, scale, causal,
                                                 source_lengths, query_offset);
  set_bsa_backward_tensors(p, q, k, v, out, lse, grad_out, grad_q, grad_k, grad_v);
  kernels.backward(p, q);
  return {grad_q_mem, grad_k_mem, grad_v_mem};
}

}  // namespace

MOEDIFFUSEQ_IMPL_CPU_AND_CUDA(m.impl("block_sparse_attention", &block_sparse_attention);
                              m.impl("block_sparse_attention_backward", &block_sparse_attention_backward);)

}  // namespace moediffuseq
