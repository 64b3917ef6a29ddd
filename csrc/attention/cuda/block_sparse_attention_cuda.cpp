// CUDA host entry points of block_sparse_attention: validation (shared with the CPU backend),
// the supported subset (no causal, no grouped-query heads: refused by name), contiguous (B, H, L, D)
// copies for layout "blhd", contiguity and alignment, outputs and workspace, device guard and current stream, and the
// dispatcher registration. Built only against a CUDA build of torch; the kernels themselves
// are torch-free (block_sparse_attention_cuda.h).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <cstdint>

#include "attention/block_sparse_attention_checks.h"
#include "attention/cuda/block_sparse_attention_cuda.h"
#include "common/cuda/device_check.h"

namespace moediffuseq::cuda {
namespace {

// Contiguous, with a 16-byte aligned start (the kernels move 16-byte pieces).
at::Tensor contiguous_aligned(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<std::uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone(at::MemoryFormat::Contiguous);
  return c;
}

// q and k are the logical (B, H, L, D) views.
void check_cuda_inputs(const at::Tensor& q, const at::Tensor& k, bool causal) {
  TORCH_CHECK(q.is_cuda(), "block_sparse_attention: expected CUDA tensors, got ", q.device());
  TORCH_CHECK(!causal, "block_sparse_attention: causal=True has CPU kernels only; the CUDA kernels support "
              "causal=False (sliding/dilated window, global tokens, key padding, layouts \"bhld\" and \"blhd\")");
  TORCH_CHECK(k.size(1) == q.size(1), "block_sparse_attention: grouped-query attention (H_kv = ", k.size(1),
              " key/value heads for H = ", q.size(1), " query heads) has CPU kernels only; the CUDA kernels "
              "support H_kv = H");
  TORCH_CHECK(bsa_cuda_supports_head_dim(q.size(3)),
              "block_sparse_attention: the CUDA kernels support head dimensions 64 and 128, got D = ", q.size(3));
  TORCH_CHECK(q.size(2) < (int64_t(1) << 30), "block_sparse_attention: sequence length too large for the CUDA "
              "kernels, got L = ", q.size(2));
  // the kernels put heads on gridDim.y and batches on gridDim.z, each limited to 65535
  TORCH_CHECK(q.size(0) <= 65535 && q.size(1) <= 65535, "block_sparse_attention: the CUDA kernels take at most "
              "65535 batches and 65535 heads, got B = ", q.size(0), ", H = ", q.size(1));
}

DType dtype_of(const at::Tensor& q) {
  return q.scalar_type() == at::kBFloat16 ? DType::kBFloat16 : DType::kFloat16;
}

// Buffers of the global tokens, only when there is a global mask: the lists ((B, L) int32
// each and the (2 B) counts) and the buffers of the split dense tiles (BsaWorkspace).
struct GlobalBuffers {
  at::Tensor queries, keys, counts, split_a, split_b;
  void fill(BsaWorkspace& ws, const at::Tensor& q, bool has_global, bool backward) {
    if (!has_global) return;
    const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
    const auto opts = q.options().dtype(at::kInt);
    queries = at::empty({B, L}, opts);
    keys = at::empty({B, L}, opts);
    counts = at::empty({2 * B}, opts);
    ws.global_queries = queries.data_ptr<int>();
    ws.global_keys = keys.data_ptr<int>();
    ws.num_global = counts.data_ptr<int>();
    ws.num_splits = bsa_cuda_num_splits(L);
    if (ws.num_splits <= 1) return;
    const auto fopts = q.options().dtype(at::kFloat);
    if (backward) {
      split_a = at::zeros({B, H, kBsaSplitTiles, 64, D}, fopts);
      split_b = at::zeros({B, H, kBsaSplitTiles, 64, D}, fopts);
      ws.split_grad_k = split_a.data_ptr<float>();
      ws.split_grad_v = split_b.data_ptr<float>();
    } else {
      split_a = at::empty({B, H, kBsaSplitTiles, ws.num_splits, 64, D}, fopts);
      split_b = at::empty({B, H, kBsaSplitTiles, ws.num_splits, 64, 2}, fopts);
      ws.split_out = split_a.data_ptr<float>();
      ws.split_max_sum = split_b.data_ptr<float>();
    }
  }
};

std::tuple<at::Tensor, at::Tensor> block_sparse_attention_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, int64_t window, int64_t dilation,
    const std::optional<at::Tensor>& global_mask_in, const std::optional<at::Tensor>& key_padding_mask_in,
    double scale, bool causal, c10::string_view layout_name) {
  const BsaLayout layout = parse_bsa_layout(layout_name);
  check_bsa_inputs(q_in, k_in, v_in, window, dilation, global_mask_in, key_padding_mask_in, scale, layout);
  check_cuda_inputs(bsa_logical(q_in, layout), bsa_logical(k_in, layout), causal);
  const CudaOpGuard guard(q_in.device());
  // The CUDA kernels take contiguous (B, H, L, D): "blhd" goes through a transposed copy here.
  const at::Tensor q = contiguous_aligned(bsa_logical(q_in, layout));
  const at::Tensor k = contiguous_aligned(bsa_logical(k_in, layout));
  const at::Tensor v = contiguous_aligned(bsa_logical(v_in, layout));
  const auto global_mask = contiguous_mask(global_mask_in), key_padding_mask = contiguous_mask(key_padding_mask_in);
  at::Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  // the output in the layout of q, contiguous there
  const auto in_layout = [&](const at::Tensor& t) { return bsa_logical(t, layout).contiguous(); };
  if (q.numel() == 0) return {in_layout(out), lse};
  BlockSparseAttentionParams p = make_bsa_params(q, k, window, dilation, global_mask, key_padding_mask, scale, false);
  set_bsa_forward_tensors(p, q, k, v, out, lse);
  BsaWorkspace ws;
  GlobalBuffers buffers;
  buffers.fill(ws, q, p.global_mask != nullptr, /*backward=*/false);
  C10_CUDA_CHECK(block_sparse_attention_fwd_cuda(p, dtype_of(q), ws, at::cuda::getCurrentCUDAStream()));
  return {in_layout(out), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_sparse_attention_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, int64_t window, int64_t dilation,
    const std::optional<at::Tensor>& global_mask_in, const std::optional<at::Tensor>& key_padding_mask_in,
    double scale, bool causal, c10::string_view layout_name) {
  const BsaLayout layout = parse_bsa_layout(layout_name);
  check_bsa_inputs(q_in, k_in, v_in, window, dilation, global_mask_in, key_padding_mask_in, scale, layout);
  // dQ (and the split dK, dV) are sums of float atomics: not bitwise reproducible run to run
  at::globalContext().alertNotDeterministic("block_sparse_attention_backward (CUDA)");
  check_bsa_tensor(grad_out_in, "grad_out", q_in, "q", layout);
  check_bsa_tensor(out_in, "out", q_in, "q", layout);
  check_bsa_lse(lse_in, bsa_logical(q_in, layout));
  check_cuda_inputs(bsa_logical(q_in, layout), bsa_logical(k_in, layout), causal);
  const CudaOpGuard guard(q_in.device());
  const auto logical = [&](const at::Tensor& t) { return contiguous_aligned(bsa_logical(t, layout)); };
  const at::Tensor q = logical(q_in), k = logical(k_in), v = logical(v_in);
  const at::Tensor grad_out = logical(grad_out_in), out = logical(out_in);
  const at::Tensor lse = lse_in.contiguous();
  const auto global_mask = contiguous_mask(global_mask_in), key_padding_mask = contiguous_mask(key_padding_mask_in);
  at::Tensor grad_q = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor grad_k = at::empty_like(k, at::MemoryFormat::Contiguous);
  at::Tensor grad_v = at::empty_like(v, at::MemoryFormat::Contiguous);
  const auto in_layout = [&](const at::Tensor& t) { return bsa_logical(t, layout).contiguous(); };
  if (q.numel() == 0) return {in_layout(grad_q), in_layout(grad_k), in_layout(grad_v)};
  BlockSparseAttentionParams p = make_bsa_params(q, k, window, dilation, global_mask, key_padding_mask, scale, false);
  set_bsa_backward_tensors(p, q, k, v, out, lse, grad_out, grad_q, grad_k, grad_v);
  at::Tensor grad_q_accum = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
  at::Tensor delta = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  BsaWorkspace ws;
  ws.grad_q_accum = grad_q_accum.data_ptr<float>();
  ws.delta = delta.data_ptr<float>();
  GlobalBuffers buffers;
  buffers.fill(ws, q, p.global_mask != nullptr, /*backward=*/true);
  C10_CUDA_CHECK(block_sparse_attention_bwd_cuda(p, dtype_of(q), ws, at::cuda::getCurrentCUDAStream()));
  return {in_layout(grad_q), in_layout(grad_k), in_layout(grad_v)};
}

}  // namespace

TORCH_LIBRARY_IMPL(moediffuseq, CUDA, m) {
  m.impl("block_sparse_attention", &block_sparse_attention_cuda);
  m.impl("block_sparse_attention_backward", &block_sparse_attention_backward_cuda);
}

}  // namespace moediffuseq::cuda
