// CPU host entry points of block_sparse_attention: validation, contiguity, output allocation,
// and the dispatcher registration.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "block_sparse_attention_checks.h"
#include "cpu/block_sparse_attention_cpu.h"

namespace moediffuseq::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> block_sparse_attention_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, int64_t window, int64_t dilation,
    const std::optional<at::Tensor>& global_mask_in, const std::optional<at::Tensor>& key_padding_mask_in,
    double scale) {
  check_bsa_inputs(q_in, k_in, v_in, window, dilation, global_mask_in, key_padding_mask_in, scale);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const auto global_mask = contiguous_mask(global_mask_in), key_padding_mask = contiguous_mask(key_padding_mask_in);
  at::Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  BlockSparseAttentionParams p = make_bsa_params(q, window, dilation, global_mask, key_padding_mask, scale);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out_mut = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  block_sparse_attention_fwd_cpu(p, q.scalar_type());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_sparse_attention_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, int64_t window, int64_t dilation,
    const std::optional<at::Tensor>& global_mask_in, const std::optional<at::Tensor>& key_padding_mask_in,
    double scale) {
  check_bsa_inputs(q_in, k_in, v_in, window, dilation, global_mask_in, key_padding_mask_in, scale);
  check_bsa_tensor(grad_out_in, "grad_out", q_in);
  check_bsa_tensor(out_in, "out", q_in);
  check_bsa_lse(lse_in, q_in);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor grad_out = grad_out_in.contiguous(), out = out_in.contiguous(), lse = lse_in.contiguous();
  const auto global_mask = contiguous_mask(global_mask_in), key_padding_mask = contiguous_mask(key_padding_mask_in);
  at::Tensor grad_q = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor grad_k = at::empty_like(k, at::MemoryFormat::Contiguous);
  at::Tensor grad_v = at::empty_like(v, at::MemoryFormat::Contiguous);
  if (q.numel() == 0) return {grad_q, grad_k, grad_v};
  BlockSparseAttentionParams p = make_bsa_params(q, window, dilation, global_mask, key_padding_mask, scale);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = const_cast<float*>(lse.data_ptr<float>());
  p.grad_out = grad_out.data_ptr();
  p.grad_q = grad_q.data_ptr();
  p.grad_k = grad_k.data_ptr();
  p.grad_v = grad_v.data_ptr();
  block_sparse_attention_bwd_cpu(p, q.scalar_type());
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(moediffuseq, CPU, m) {
  m.impl("block_sparse_attention", &block_sparse_attention_cpu);
  m.impl("block_sparse_attention_backward", &block_sparse_attention_backward_cpu);
}

}  // namespace moediffuseq::cpu
