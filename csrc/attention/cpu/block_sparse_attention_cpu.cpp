// The CPU backend of block_sparse_attention: it reads any tensor whose rows are contiguous and
// has no limits beyond the shared checks; its BsaKernels table serves the one host entry
// (attention/block_sparse_attention.cpp).
#include <ATen/ATen.h>

#include "attention/block_sparse_attention_backend.h"
#include "attention/block_sparse_attention_checks.h"
#include "attention/cpu/block_sparse_attention_cpu.h"
#include "common/backends.h"

namespace moediffuseq::cpu {
namespace {

const KernelsRegistration<BsaKernels> registration(
    c10::DeviceType::CPU,
    {/*check=*/[](const at::Tensor&, const at::Tensor&) {},
     /*readable=*/[](const at::Tensor& t) { return bsa_rows_contiguous(t); },
     /*forward=*/[](const BlockSparseAttentionParams& p, const at::Tensor& q) {
       block_sparse_attention_fwd_cpu(p, q.scalar_type());
     },
     /*backward=*/[](const BlockSparseAttentionParams& p, const at::Tensor& q) {
       block_sparse_attention_bwd_cpu(p, q.scalar_type());
     }});

}  // namespace
}  // namespace moediffuseq::cpu
