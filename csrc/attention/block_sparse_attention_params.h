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
// (i - j) mod dilation == 0)) and (not causal or j <= i) and (i >= S_b or j < S_b)   (METHOD §3):
// under causal a global token attends to the past only and is attended by the queries at or
// after it. i and j are positions of the key sequence (length L = seqlen); query row r is
// position i = query_offset + r (0 <= query_offset, query_offset + q_len <= L), and every mask
// is on positions. Source isolation: positions [0, S_b) of batch b are its source
// (S_b = source_lengths[b], 0 <= S_b <= L; no array: S_b = 0, no isolation); a source query
// (i < S_b) sees only source keys, a target query attends as without isolation.
// Logical shapes: q, out, grad_out, grad_q (B, H, q_len, D); k, v, grad_k, grad_v (B, kv_heads,
// L, D), query head h reads key/value head h / (heads / kv_heads) (grouped-query attention). Each tensor
// has its own strides (so (B, L, H, D) memory goes in as it is); the CUDA kernels also need rows
// 16-byte aligned (their backend copies a tensor that is not).
struct BlockSparseAttentionParams {
  int64_t batch = 0;
  int64_t heads = 0;
  int64_t kv_heads = 0;
  int64_t seqlen = 0;        // L: keys and values, and the positions every mask is on
  int64_t q_len = 0;         // query rows, <= seqlen
  int64_t query_offset = 0;  // query row r is position query_offset + r
  int64_t head_dim = 0;
  int64_t window = 0;    // one-sided window w, >= 0
  int64_t dilation = 1;  // d >= 1
  float scale = 1.f;     // multiplies q . k
  bool causal = false;   // additionally j <= i

  BsaStrides q_strides, k_strides, v_strides, out_strides, grad_out_strides;
  BsaStrides grad_q_strides, grad_k_strides, grad_v_strides;

  const bool* global_mask = nullptr;       // (B, L), true = global token; may be null
  const bool* key_padding_mask = nullptr;  // (B, L), true = padded key; may be null
  const int64_t* source_lengths = nullptr;  // (B) source lengths S_b in [0, L]; null: no isolation

  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* out = nullptr;  // forward output (an input of the backward)
  float* lse = nullptr;       // contiguous (B, H, q_len) log-sum-exp of the scaled scores, +inf if no key

  void* out_mut = nullptr;          // forward: written
  const void* grad_out = nullptr;   // backward inputs
  void* grad_q = nullptr;           // backward outputs
  void* grad_k = nullptr;
  void* grad_v = nullptr;
};

// The last key position that query position i may see through causality and source isolation
// (S: the source length of its batch, 0 without isolation; L: the key length): the keys after it
// are never allowed. Non-decreasing in i, so a tile's last row bounds the keys of the tile.
MOEDIFFUSEQ_HOST_DEVICE int64_t bsa_key_limit(int64_t i, int64_t S, int64_t L, bool causal) {
  int64_t limit = causal ? i : L - 1;
  if (i < S && S - 1 < limit) limit = S - 1;
  return limit;
}

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
