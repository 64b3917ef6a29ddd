// The CPU backend of block_sparse_attention: it reads any tensor whose rows are contiguous and
// has no limits beyond the shared checks; registered with the dispatcher through the one host
// entry (attention/block_sparse_attention.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "attention/block_sparse_attention.h"
#include "attention/cpu/block_sparse_attention_cpu.h"

namespace moediffuseq::cpu {
namespace {

struct CpuBackend {
  static void check(const at::Tensor&, const at::Tensor&, bool) {}
  static at::Tensor readable(const at::Tensor& t) { return bsa_rows_contiguous(t); }
  static void forward(const BlockSparseAttentionParams& p, const at::Tensor& q) {
    block_sparse_attention_fwd_cpu(p, q.scalar_type());
  }
  static void backward(const BlockSparseAttentionParams& p, const at::Tensor& q) {
    block_sparse_attention_bwd_cpu(p, q.scalar_type());
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(moediffuseq, CPU, m) {
  m.impl("block_sparse_attention", &block_sparse_attention_entry<CpuBackend>);
  m.impl("block_sparse_attention_backward", &block_sparse_attention_backward_entry<CpuBackend>);
}

}  // namespace moediffuseq::cpu
