// Plain parameters of the block-sparse attention kernels, shared by every backend.
// No torch header here: CUDA kernels include it and compile with nvcc alone.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace moediffuseq {

// Strides (in elements) of a logical (B, H, L, D) tensor whose last dimension is contiguous.
struct BsaStrides {
  int64_t batch = 0;
  int64_t head = 0;
  int64_t row = 0;  // one position l to the next
  // Element offset of row l of head h of batch b.
  MOEDIFFUSEQ_HOST_DEVICE int64_t at(int64_t b, int64_t h, int64_t l) const { return b * batch + h * head + l * row; }
};

// allowed(i, j) = j not padded and (i global or j global or (|i - j| <= window * dilation and
// (i - j) mod dilation == 0)) and (not causal or j <= i)   (METHOD §3): under causal a global
// token attends to the past only and is attended by the queries at or after it.
// Logical shapes: q, out, grad_out, grad_q (B, H, L, D); k, v, grad_k, grad_v (B, kv_heads, L, D),
// query head h reads key/value head h / (heads / kv_heads) (grouped-query attention). Each tensor
// has its own strides (so (B, L, H, D) memory goes in as it is); the CUDA kernels also need rows
// 16-byte aligned (their backend copies a tensor that is not).
struct BlockSparseAttentionParams {
  int64_t batch = 0;
  int64_t heads = 0;
  int64_t kv_heads = 0;
  int64_t seqlen = 0;
  int64_t head_dim = 0;
  int64_t window = 0;    // one-sided window w, >= 0
  int64_t dilation = 1;  // d >= 1
  float scale = 1.f;     // multiplies q . k
  bool causal = false;   // additionally j <= i

  BsaStrides q_strides, k_strides, v_strides, out_strides, grad_out_strides;
  BsaStrides grad_q_strides, grad_k_strides, grad_v_strides;

  const bool* global_mask = nullptr;       // (B, L), true = global token; may be null
  const bool* key_padding_mask = nullptr;  // (B, L), true = padded key; may be null

  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* out = nullptr;  // forward output (an input of the backward)
  float* lse = nullptr;       // contiguous (B, H, L) log-sum-exp of the scaled scores, +inf if no key

  void* out_mut = nullptr;          // forward: written
  const void* grad_out = nullptr;   // backward inputs
  void* grad_q = nullptr;           // backward outputs
  void* grad_k = nullptr;
  void* grad_v = nullptr;
};

// The window and dilation saturated at the sequence length L, an exact rewrite: with d >= L
// every residue subsequence holds one position (the band is the diagonal), and no two slots
// of a subsequence are L or more apart (a window >= L covers them all). Afterwards both fit
// the int arithmetic of the kernels for any int64 input, and nothing sized by d is huge.
inline void clamp_window_and_dilation(BlockSparseAttentionParams& p) {
  const int64_t L = p.seqlen > 1 ? p.seqlen : 1;
  if (p.window > L) p.window = L;
  if (p.dilation > L) p.dilation = L;
}

}  // namespace moediffuseq
