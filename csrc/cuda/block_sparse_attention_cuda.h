// CUDA kernels of block-sparse attention: the torch-free launch interface between the
// kernel files (nvcc alone, CUTLASS/CuTe) and the torch glue (block_sparse_attention_cuda.cpp).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/block_sparse_attention_params.h"

namespace moediffuseq::cuda {

enum class BsaDtype { kBFloat16, kFloat16 };

// Device buffers besides the tensors of BlockSparseAttentionParams (all on the current device).
struct BsaWorkspace {
  int* global_queries = nullptr;  // (B, L): positions of the global rows of batch b, compact
  int* global_keys = nullptr;     // (B, L): positions of the global, not padded keys, compact
  int* num_global = nullptr;      // (2 B): [b] global rows, [B + b] global keys
  float* grad_q_accum = nullptr;  // backward: (B, H, L, D) float32, zero on entry
  float* delta = nullptr;         // backward: (B, H, L) rowsum(grad_out * out)
};

// Head dimensions with compiled kernels (others are rejected by the host entry point).
inline bool bsa_cuda_supports_head_dim(int64_t head_dim) { return head_dim == 64 || head_dim == 128; }

// Both run on `stream` and return the first launch error (cudaSuccess when all launched).
// The global lists in `ws` are built here when params.global_mask is set.
// Forward: writes params.out_mut and params.lse.
cudaError_t block_sparse_attention_fwd_cuda(const BlockSparseAttentionParams& params, BsaDtype dtype,
                                            const BsaWorkspace& ws, cudaStream_t stream);
// Backward: writes params.grad_q, grad_k, grad_v.
cudaError_t block_sparse_attention_bwd_cuda(const BlockSparseAttentionParams& params, BsaDtype dtype,
                                            const BsaWorkspace& ws, cudaStream_t stream);

}  // namespace moediffuseq::cuda
