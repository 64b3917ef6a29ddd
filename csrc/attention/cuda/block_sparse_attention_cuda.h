// CUDA kernels of block-sparse attention: the torch-free launch interface between the
// kernel files (nvcc alone, CUTLASS/CuTe) and the torch glue (block_sparse_attention_cuda.cpp).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "attention/block_sparse_attention_params.h"
#include "common/dtype.h"

namespace moediffuseq::cuda {

// Device buffers besides the tensors of BlockSparseAttentionParams (all on the current device).
struct BsaWorkspace {
  int* global_queries = nullptr;  // (B, L): positions of the global query rows of batch b, compact
  int* global_keys = nullptr;     // (B, L): positions of the global, not padded keys, compact
  int* num_global = nullptr;      // (2 B): [b] global rows, [B + b] global keys
  float* grad_q_accum = nullptr;  // backward: (B, H, L_q, D) float32, zero on entry
  float* delta = nullptr;         // backward: (B, H, L_q) rowsum(grad_out * out)

  // Splitting of the dense parts (global rows x all keys, global keys x all queries) over
  // num_splits CTAs per 64-row tile, for the first kBsaSplitTiles tiles of each list; with
  // num_splits = 1 nothing is split and these buffers are not used.
  int num_splits = 1;
  float* split_out = nullptr;  // forward: (B, H, kBsaSplitTiles, num_splits, 64, D) unnormalised outputs
  float* split_max_sum = nullptr;  // forward: (B, H, kBsaSplitTiles, num_splits, 64, 2) row max (log2), row sum
  float* split_grad_k = nullptr;   // backward: (B, H_kv, kBsaSplitTiles, 64, D), zero on entry
  float* split_grad_v = nullptr;   // backward: (B, H_kv, kBsaSplitTiles, 64, D), zero on entry
};

// Rows of a query tile and of a key tile.
constexpr int kBsaTile = 64;

// Tiles of global rows (forward) or global keys (backward) that are split; further tiles run whole.
constexpr int kBsaSplitTiles = 4;

// Splits per dense tile: one per 64 tiles of the sequence (each split visits at least 64 tiles),
// at most 16.
inline int bsa_cuda_num_splits(int64_t seqlen) {
  const int64_t tiles = (seqlen + 63) / 64;
  const int64_t splits = tiles / 64;
  return static_cast<int>(splits < 1 ? 1 : (splits > 16 ? 16 : splits));
}

// Head dimensions with compiled kernels (others are rejected by the host entry point).
inline bool bsa_cuda_supports_head_dim(int64_t head_dim) { return head_dim == 64 || head_dim == 128; }

// Both run on `stream` and return the first launch error (cudaSuccess when all launched).
// The global lists in `ws` are built here when params.global_mask is set.
// Forward: writes params.out_mut and params.lse.
cudaError_t block_sparse_attention_fwd_cuda(const BlockSparseAttentionParams& params, DType dtype,
                                            const BsaWorkspace& ws, cudaStream_t stream);
// Backward: writes params.grad_q, grad_k, grad_v.
cudaError_t block_sparse_attention_bwd_cuda(const BlockSparseAttentionParams& params, DType dtype,
                                            const BsaWorkspace& ws, cudaStream_t stream);

}  // namespace moediffuseq::cuda
