// CPU host entry points of block_sparse_attention: validation, layouts and strides, output
// allocation, and the dispatcher registration.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "attention/block_sparse_attention_checks.h"
#include "attention/cpu/block_sparse_attention_cpu.h"

namespace moediffuseq::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> block_sparse_attention_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, int64_t window, int64_t dilation,
    const std::optional<at::Tensor>& global_mask_in, const std::optional<at::Tensor>& key_padding_mask_in,
    double scale, bool causal, c10::string_view layout_name) {
  const BsaLayout layout = parse_bsa_layout(layout_name);
  check_bsa_inputs(q_in, k_in, v_in, window, dilation, global_mask_in, key_padding_mask_in, scale, layout);
  // logical (B, H, L, D) views of the caller's memory: no transpose copy
  const at::Tensor q = bsa_logical(bsa_rows_contiguous(q_in), layout);
  const at::Tensor k = bsa_logical(bsa_rows_contiguous(k_in), layout);
  const at::Tensor v = bsa_logical(bsa_rows_contiguous(v_in), layout);
  const auto global_mask = contiguous_mask(global_mask_in), key_padding_mask = contiguous_mask(key_padding_mask_in);
  const at::Tensor out_mem = at::empty(q_in.sizes(), q_in.options().memory_format(at::MemoryFormat::Contiguous));
  const at::Tensor out = bsa_logical(out_mem, layout);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out_mem, lse};
  BlockSparseAttentionParams p = make_bsa_params(q, k, window, dilation, global_mask, key_padding_mask, scale, causal);
  set_bsa_forward_tensors(p, q, k, v, out, lse);
  block_sparse_attention_fwd_cpu(p, q.scalar_type());
  return {out_mem, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_sparse_attention_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, int64_t window, int64_t dilation,
    const std::optional<at::Tensor>& global_mask_in, const std::optional<at::Tensor>& key_padding_mask_in,
    double scale, bool causal, c10::string_view layout_name) {
  const BsaLayout layout = parse_bsa_layout(layout_name);
  check_bsa_inputs(q_in, k_in, v_in, window, dilation, global_mask_in, key_padding_mask_in, scale, layout);
  check_bsa_tensor(grad_out_in, "grad_out", q_in, "q", layout);
  check_bsa_tensor(out_in, "out", q_in, "q", layout);
  const at::Tensor q = bsa_logical(bsa_rows_contiguous(q_in), layout);
  const at::Tensor k = bsa_logical(bsa_rows_contiguous(k_in), layout);
  const at::Tensor v = bsa_logical(bsa_rows_contiguous(v_in), layout);
  const at::Tensor grad_out = bsa_logical(bsa_rows_contiguous(grad_out_in), layout);
  const at::Tensor out = bsa_logical(bsa_rows_contiguous(out_in), layout);
  check_bsa_lse(lse_in, q);
  const at::Tensor lse = lse_in.contiguous();
  const auto global_mask = contiguous_mask(global_mask_in), key_padding_mask = contiguous_mask(key_padding_mask_in);
  const auto contiguous = [](const at::Tensor& t) {
    return at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous));
  };
  at::Tensor grad_q_mem = contiguous(q_in), grad_k_mem = contiguous(k_in), grad_v_mem = contiguous(v_in);
  if (q.numel() == 0) return {grad_q_mem, grad_k_mem.zero_(), grad_v_mem.zero_()};
  const at::Tensor grad_q = bsa_logical(grad_q_mem, layout), grad_k = bsa_logical(grad_k_mem, layout),
                   grad_v = bsa_logical(grad_v_mem, layout);
  BlockSparseAttentionParams p = make_bsa_params(q, k, window, dilation, global_mask, key_padding_mask, scale, causal);
  set_bsa_backward_tensors(p, q, k, v, out, lse, grad_out, grad_q, grad_k, grad_v);
  block_sparse_attention_bwd_cpu(p, q.scalar_type());
  return {grad_q_mem, grad_k_mem, grad_v_mem};
}

}  // namespace

TORCH_LIBRARY_IMPL(moediffuseq, CPU, m) {
  m.impl("block_sparse_attention", &block_sparse_attention_cpu);
  m.impl("block_sparse_attention_backward", &block_sparse_attention_backward_cpu);
}

}  // namespace moediffuseq::cpu
