// The CUDA backend of block_sparse_attention: its limits (head dimensions 64 and 128, grid
// sizes), the tensors its kernels read in place (16-byte aligned rows), the workspace of a call
// and the current stream; its BsaKernels table serves the one host entry
// (attention/block_sparse_attention.cpp), which holds the device guard. Built only against a
// CUDA build of torch; the kernels themselves are torch-free (block_sparse_attention_cuda.h).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>

#include "attention/block_sparse_attention_backend.h"
#include "attention/block_sparse_attention_checks.h"
#include "attention/cuda/block_sparse_attention_cuda.h"
#include "common/backends.h"

namespace moediffuseq::cuda {
namespace {

// The kernels move 16-byte pieces of rows: the start and every stride of the logical
// (B, H, L) dimensions must be multiples of 16 bytes, and the rows contiguous.
bool rows_aligned(const at::Tensor& t) {
  const int64_t elems = 16 / static_cast<int64_t>(t.element_size());
  if (reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  if (t.size(-1) > 1 && t.stride(-1) != 1) return false;
  for (int64_t dim = 0; dim + 1 < t.dim(); ++dim) {
    if (t.size(dim) > 1 && t.stride(dim) % elems != 0) return false;
  }
  return true;
}

DType dtype_of(const at::Tensor& q) {
  return q.scalar_type() == at::kBFloat16 ? DType::kBFloat16 : DType::kFloat16;
}

// Buffers of the global tokens, only when there is a global mask: the lists ((B, L) int32
// each, L the key length, and the (2 B) counts) and the buffers of the split dense tiles (BsaWorkspace).
struct GlobalBuffers {
  at::Tensor queries, keys, counts, split_a, split_b;
  void fill(BsaWorkspace& ws, const BlockSparseAttentionParams& p, const at::Tensor& q, bool backward) {
    if (p.global_mask == nullptr) return;
    const int64_t B = p.batch, H = p.heads, L = p.seqlen, D = p.head_dim;
    const auto opts = q.options().dtype(at::kInt);
    queries = at::empty({B, L}, opts);
    keys = at::empty({B, L}, opts);
    counts = at::empty({2 * B}, opts);
    ws.global_queries = queries.data_ptr<int>();
    ws.global_keys = keys.data_ptr<int>();
    ws.num_global = counts.data_ptr<int>();
    // the split side: the keys of the global rows (forward), the query rows of the global keys (backward)
    ws.num_splits = bsa_cuda_num_splits(backward ? p.q_len : L);
    if (ws.num_splits <= 1) return;
    const auto fopts = q.options().dtype(at::kFloat);
    if (backward) {
      split_a = at::zeros({B, p.kv_heads, kBsaSplitTiles, kBsaTile, D}, fopts);
      split_b = at::zeros({B, p.kv_heads, kBsaSplitTiles, kBsaTile, D}, fopts);
      ws.split_grad_k = split_a.data_ptr<float>();
      ws.split_grad_v = split_b.data_ptr<float>();
    } else {
      split_a = at::empty({B, H, kBsaSplitTiles, ws.num_splits, kBsaTile, D}, fopts);
      split_b = at::empty({B, H, kBsaSplitTiles, ws.num_splits, kBsaTile, 2}, fopts);
      ws.split_out = split_a.data_ptr<float>();
      ws.split_max_sum = split_b.data_ptr<float>();
    }
  }
};

void check(const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK(bsa_cuda_supports_head_dim(q.size(3)),
              "block_sparse_attention: the CUDA kernels support head dimensions 64 and 128, got D = ", q.size(3));
  TORCH_CHECK(k.size(2) < (int64_t(1) << 30), "block_sparse_attention: sequence length too large for the CUDA "
              "kernels, got L = ", k.size(2));
  // the kernels put heads on gridDim.y and batches on gridDim.z, each limited to 65535
  TORCH_CHECK(q.size(0) <= 65535 && q.size(1) <= 65535 && k.size(1) <= 65535,
              "block_sparse_attention: the CUDA kernels take at most 65535 batches and 65535 heads, got B = ",
              q.size(0), ", H = ", q.size(1));
}

at::Tensor readable(const at::Tensor& t) {
  if (rows_aligned(t)) return t;
  at::Tensor c = t.contiguous();
  return rows_aligned(c) ? c : c.clone(at::MemoryFormat::Contiguous);
}

void forward(const BlockSparseAttentionParams& p, const at::Tensor& q) {
  BsaWorkspace ws;
  GlobalBuffers buffers;
  buffers.fill(ws, p, q, /*backward=*/false);
  C10_CUDA_CHECK(block_sparse_attention_fwd_cuda(p, dtype_of(q), ws, at::cuda::getCurrentCUDAStream()));
}

void backward(const BlockSparseAttentionParams& p, const at::Tensor& q) {
  // dQ (and the split dK, dV) are sums of float atomics: not bitwise reproducible run to run
  at::globalContext().alertNotDeterministic("block_sparse_attention_backward (CUDA)");
  at::Tensor grad_q_accum = at::zeros({p.batch, p.heads, p.q_len, p.head_dim}, q.options().dtype(at::kFloat));
  at::Tensor delta = at::empty({p.batch, p.heads, p.q_len}, q.options().dtype(at::kFloat));
  BsaWorkspace ws;
  ws.grad_q_accum = grad_q_accum.data_ptr<float>();
  ws.delta = delta.data_ptr<float>();
  GlobalBuffers buffers;
  buffers.fill(ws, p, q, /*backward=*/true);
  C10_CUDA_CHECK(block_sparse_attention_bwd_cuda(p, dtype_of(q), ws, at::cuda::getCurrentCUDAStream()));
}

const KernelsRegistration<BsaKernels> registration(c10::DeviceType::CUDA, {check, readable, forward, backward});

}  // namespace
}  // namespace moediffuseq::cuda
