// The dilation decomposition of block-sparse attention, the one both backends tile by
// (torch-free, host and device).
//
// Dilation d is handled as d interleaved plain windows: the positions with one residue
// r = i mod d form a subsequence (slot t = i / d, position r + d t) in which the dilated window
// is a plain window of half-width w. Slot order is position order, so under causal a key slot
// is seen by the query slots at or after it. Blocks are runs of `block` consecutive slots of one
// subsequence; both backends read their rows with a stride of d positions.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace moediffuseq {

struct ResidueSubsequences {
  int64_t L = 0;
  int64_t d = 1;

  // Number of positions i < L with i mod d == r.
  MOEDIFFUSEQ_HOST_DEVICE int64_t length(int64_t r) const { return r < L ? (L - r + d - 1) / d : 0; }
  // Number of slots of residue r at positions below pos: the first slot at or after pos.
  MOEDIFFUSEQ_HOST_DEVICE int64_t slots_below(int64_t pos, int64_t r) const { return pos > r ? (pos - r + d - 1) / d : 0; }
  // Index of the first slot of residue r when the subsequences are laid out one after another.
  MOEDIFFUSEQ_HOST_DEVICE int64_t offset(int64_t r) const {
    const int64_t m = L % d;
    return r * (L / d) + (r < m ? r : m);
  }
  MOEDIFFUSEQ_HOST_DEVICE static int64_t blocks_of(int64_t n, int64_t block) { return (n + block - 1) / block; }
  // Blocks over all residues: the first L mod d residues have L / d + 1 slots, the others L / d.
  MOEDIFFUSEQ_HOST_DEVICE int64_t num_blocks(int64_t block) const {
    const int64_t m = L % d, q = L / d;
    return m * blocks_of(q + 1, block) + (d - m) * blocks_of(q, block);
  }
  // Block number x (residue-major) -> (residue r, first slot t0).
  MOEDIFFUSEQ_HOST_DEVICE void decode(int64_t x, int64_t block, int64_t& r, int64_t& t0) const {
    const int64_t m = L % d, q = L / d;
    const int64_t a = blocks_of(q + 1, block), b = blocks_of(q, block);
    if (x < m * a) {
      r = x / a;
      t0 = (x % a) * block;
    } else {
      x -= m * a;
      r = m + x / b;
      t0 = (x % b) * block;
    }
  }
};

// Whether query slot t sees key slot t - dt of its subsequence through the band.
MOEDIFFUSEQ_HOST_DEVICE bool band_pair(int64_t dt, int64_t w, bool causal) { return dt <= w && dt >= (causal ? 0 : -w); }

// Whether every pair of query slots [t0, t0 + n) and key slots [c0, c0 + n) is in the band.
MOEDIFFUSEQ_HOST_DEVICE bool band_block_full(int64_t t0, int64_t c0, int64_t n, int64_t w, bool causal) {
  return band_pair(t0 + n - 1 - c0, w, causal) && band_pair(t0 - (c0 + n - 1), w, causal);
}

// Key slots [lo, hi) that the query slots [t0, t1) of a subsequence of `len` slots see.
MOEDIFFUSEQ_HOST_DEVICE void band_keys(int64_t len, int64_t t0, int64_t t1, int64_t w, bool causal, int64_t& lo,
                                       int64_t& hi) {
  const int64_t end = causal ? t1 : t1 + w;
  lo = t0 - w > 0 ? t0 - w : 0;
  hi = end < len ? end : len;
}

// Query slots [lo, hi) that see the key slots [c0, c1) of a subsequence of `len` slots.
MOEDIFFUSEQ_HOST_DEVICE void band_queries(int64_t len, int64_t c0, int64_t c1, int64_t w, bool causal, int64_t& lo,
                                          int64_t& hi) {
  lo = causal ? c0 : (c0 - w > 0 ? c0 - w : 0);
  hi = c1 + w < len ? c1 + w : len;
}

}  // namespace moediffuseq
